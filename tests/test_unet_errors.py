"""Bad inputs to the UNet3D and the ReferenceNet raise ValueErrors that say what is wrong."""

import dataclasses
import json

import pytest
import torch

from conftest import FIXTURES
from musev_lite.referencenet import ReferenceNet
from musev_lite.convert.musev import unet_config_from_diffusers
from musev_lite.unet import Conditioning, ReferenceFeatures, UNet3D, UNet3DConfig
from musev_lite.weights import WeightsError


def tiny_models():
    """Tiny referencenet-flavour UNet (preset "tiny") and a musev-flavour one (no IP, no refer fusion)."""
    torch.manual_seed(0)
    tiny = UNet3DConfig.preset("tiny")
    musev_switches = {"transformer_in": True, "anivv1": False, "skip_time_act": False, "zero_condition_temb": False,
                      "refer_fusion": False, "ip_cross_attention": False}
    return UNet3D(tiny).eval(), UNet3D(dataclasses.replace(tiny, **musev_switches)).eval()


def test_bad_inputs_are_named():
    referencenet_unet, musev_unet = tiny_models()
    sample, text = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 32)
    ip = torch.randn(2, 4, 32)
    maps = ReferenceFeatures([torch.randn(2, 32, 8, 8)] * 12, torch.randn(2, 32, 1, 1))
    cases = [
        (referencenet_unet, dict(sample=torch.randn(2, 4, 8, 8)), r"sample must be \(B, 4, T, h, w\); got shape \(2, 4, 8, 8\)"),
        (referencenet_unet, dict(text=torch.randn(1, 5, 32)), r"text must be \(B=2, tokens, 32\)"),
        (referencenet_unet, dict(text=torch.randn(2, 5, 768)), r"text must be .* got \(2, 5, 768\)"),
        (referencenet_unet, dict(condition_frames=4), "condition_frames=4 must be between 0 and the sample's T=3"),
        (referencenet_unet, dict(ip_tokens=torch.randn(1, 4, 32)), r"ip_tokens must be \(B=2, tokens, 32\)"),
        (referencenet_unet, dict(refer=ReferenceFeatures(maps.down[:11], maps.mid)), "refer must hold 12 down maps"),
        (referencenet_unet, dict(refer=ReferenceFeatures(maps.down, torch.randn(1, 32, 1, 1))), "refer must hold"),
        (musev_unet, dict(ip_tokens=ip), "no IP-Adapter attention"),
        (musev_unet, dict(refer=maps), "no ReferenceNet fusion"),
    ]
    for unet, bad, message in cases:
        args = dict(sample=sample, text=text) | bad
        sample_, text_ = args.pop("sample"), args.pop("text")
        condition_frames = args.pop("condition_frames", 1)
        with pytest.raises(ValueError, match=message):
            unet(sample_, 10.0, Conditioning(text_, motion_speed=8.0, **args), condition_frames=condition_frames)
    with torch.no_grad():  # and the good call runs
        good = Conditioning(text, motion_speed=8.0, ip_tokens=ip, refer=maps)
        assert referencenet_unet(sample, 10.0, good).shape == sample.shape


def test_referencenet_bad_inputs():
    net = ReferenceNet(UNet3DConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"latent must be \(B, 4, h, w\)"):
        net(torch.randn(2, 4, 1, 8, 8), 0.0, torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match=r"context must be \(B=2, tokens, 32\)"):
        net(torch.randn(2, 4, 8, 8), 0.0, torch.randn(2, 4, 16))


def test_config_from_unsupported_diffusers_config():
    config = json.loads((FIXTURES / "unet2d/config.json").read_text())
    with pytest.raises(WeightsError, match="not the SD1.5 layout"):
        unet_config_from_diffusers(dict(config, down_block_types=["DownBlock2D"] * 4), "musev")
    with pytest.raises(WeightsError, match=r"attention_head_dim \[2, 4, 2, 2\] differs per level"):
        unet_config_from_diffusers(dict(config, attention_head_dim=[2, 4, 2, 2]), "musev")
    assert unet_config_from_diffusers(dict(config, attention_head_dim=[2] * 4), "musev").heads == 2

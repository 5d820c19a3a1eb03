"""UNet3D in 2D mode against diffusers' UNet2DConditionModel (tests/fixtures/unet2d, made by
tests/make_fixtures.py), and clear errors for bad inputs."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error
from musev_lite.referencenet import ReferenceNet
from musev_lite.unet import ReferenceFeatures, UNet3D, UNet3DConfig
from musev_lite.weights import WeightsError, load_weights

TEMPORAL_KEYS = ("temp_convs.", "temp_attentions.", "transformer_in.", "frame_embedding.")


def sd_unet_in_2d_mode():
    """Our UNet3D with the SD1.5 weights of the fixture; its temporal layers stay random (unused)."""
    config = json.loads((FIXTURES / "unet2d/config.json").read_text())
    cfg = UNet3DConfig.from_diffusers(config, "musev")
    # plain SD: LayerNorm eps 1e-5 everywhere; the temporal layers only need groups that fit 8 channels
    cfg = dataclasses.replace(cfg, transformer_norm_eps=1e-5, temporal_conv_groups=4, transformer_in_groups=4)
    unet = UNet3D(cfg).eval()
    state = {k: v.float() for k, v in load_file(FIXTURES / "unet2d/weights.safetensors").items()}
    missing = set(unet.state_dict()) - set(state)
    assert missing and all(any(part in k for part in TEMPORAL_KEYS) for k in missing)
    load_weights(unet, state, "unet2d fixture", allow_missing=True)  # unexpected / mis-shaped keys still fail
    return unet


def test_2d_mode_is_the_sd_unet():
    """Tolerance 1e-5 (fp32, a single SD module). Fractional timestep 499.5 and a 12x20 latent."""
    unet = sd_unet_in_2d_mode()
    io = load_file(FIXTURES / "unet2d/io.safetensors")
    with torch.no_grad():
        for condition_frames in (0, 1):  # with one frame there is nothing to attend to: same result
            out = unet(io["sample"][:, :, None], io["timestep"], io["text"], condition_frames=condition_frames,
                       temporal=False)
            what = f"2D mode vs diffusers UNet2DConditionModel, condition_frames={condition_frames}"
            assert max_abs_error(out[:, :, 0], io["out"], what) <= 1e-5
        # a scalar timestep is the same for the whole batch
        out = unet(io["sample"][:1, :, None], io["timestep"][0], io["text"][:1], temporal=False)
        assert max_abs_error(out[:, :, 0], io["out"][:1], "scalar timestep") <= 1e-5


def test_temporal_layers_are_skipped_in_2d_mode():
    """The random temporal layers change the output when they run, and not in 2D mode."""
    unet = sd_unet_in_2d_mode()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("temporal_weight"):
                p.fill_(0.5)  # open the gates (initialised near 0)
    io = load_file(FIXTURES / "unet2d/io.safetensors")
    sample = io["sample"][:, :, None]
    with torch.no_grad():
        video = unet(sample, io["timestep"], io["text"], condition_frames=0)
        image = unet(sample, io["timestep"], io["text"], condition_frames=0, temporal=False)
    assert (video[:, :, 0] - io["out"]).abs().max() > 1e-2
    assert max_abs_error(image[:, :, 0], io["out"], "2D mode with open temporal gates") <= 1e-5


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
        with pytest.raises(ValueError, match=message):
            unet(sample_, 10.0, text_, **args)
    with torch.no_grad():  # and the good call runs
        assert referencenet_unet(sample, 10.0, text, ip_tokens=ip, refer=maps).shape == sample.shape


def test_referencenet_bad_inputs():
    net = ReferenceNet(UNet3DConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"latent must be \(B, 4, h, w\)"):
        net(torch.randn(2, 4, 1, 8, 8), 0.0, torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match=r"context must be \(B=2, tokens, 32\)"):
        net(torch.randn(2, 4, 8, 8), 0.0, torch.randn(2, 4, 16))


def test_config_from_unsupported_diffusers_config():
    config = json.loads((FIXTURES / "unet2d/config.json").read_text())
    with pytest.raises(WeightsError, match="not the SD1.5 layout"):
        UNet3DConfig.from_diffusers(dict(config, down_block_types=["DownBlock2D"] * 4), "musev")
    with pytest.raises(WeightsError, match=r"attention_head_dim \[2, 4, 2, 2\] differs per level"):
        UNet3DConfig.from_diffusers(dict(config, attention_head_dim=[2, 4, 2, 2]), "musev")
    assert UNet3DConfig.from_diffusers(dict(config, attention_head_dim=[2] * 4), "musev").heads == 2

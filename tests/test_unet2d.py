"""UNet3D in 2D mode (temporal layers off) is SD1.5's UNet: compared with diffusers'
UNet2DConditionModel at tiny random weights (fixture from tests/make_fixtures.py). Tolerance 1e-5."""

import json

import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error
from musev_lite.unet import UNet3D, UNet3DConfig
from musev_lite.weights import load_weights, read_state_dict


def test_2d_mode_equals_diffusers_unet2d():
    config = json.loads((FIXTURES / "unet2d/config.json").read_text())
    # diffusers' transformer blocks use LayerNorm eps 1e-5 everywhere: set MuseV's quirk to that
    cfg = UNet3DConfig.from_diffusers(config, "musev")
    cfg.transformer_norm_eps = 1e-5
    cfg.temporal_conv_groups = cfg.transformer_in_groups = 4
    unet = UNet3D(cfg).eval()
    weights = FIXTURES / "unet2d/weights.safetensors"
    sd_keys = {k: v.float() for k, v in read_state_dict(weights).items()}
    # the SD keys fill the spatial layers; the temporal ones stay at their init and are skipped
    load_weights(unet, sd_keys, str(weights), allow_missing=True)
    assert all(k.startswith(("transformer_in", "frame_embedding")) or "temp_" in k
               for k in set(unet.state_dict()) - set(sd_keys))
    io = load_file(FIXTURES / "unet2d/io.safetensors")
    with torch.no_grad():
        out = unet(io["sample"][:, :, None], io["timestep"], io["text"], condition_frames=0, temporal=False)
    assert max_abs_error(out[:, :, 0], io["out"], "2D mode vs UNet2DConditionModel") <= 1e-5

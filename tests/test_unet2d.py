"""UNet3D in 2D mode (temporal layers off) is SD1.5's UNet: compared with diffusers'
UNet2DConditionModel at tiny random weights (fixture from tests/make_fixtures.py). Tolerance: rounding through
the UNet's reductions, fp32 (conftest.rounding_tolerance; its temporal layers count too, an upper bound)."""

import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error, reduction_depth, rounding_tolerance, sd_unet
from musev_lite.unet import Conditioning


def test_2d_mode_equals_diffusers_unet2d():
    """Fractional timestep 499.5, a 12x10 latent (the up path meets odd sizes)."""
    unet = sd_unet()
    io = load_file(FIXTURES / "unet2d/io.safetensors")
    sample = io["sample"][:, :, None]  # b c 1 h w
    tolerance = rounding_tolerance(io["out"], reduction_depth(unet))
    with torch.no_grad():
        out = unet(sample, io["timestep"], Conditioning(io["text"], motion_speed=8.0), condition_frames=0, temporal=False)
        assert max_abs_error(out[:, :, 0], io["out"], "2D mode vs UNet2DConditionModel") <= tolerance
        # one frame has nothing to attend to besides itself: a condition frame changes nothing
        out = unet(sample, io["timestep"], Conditioning(io["text"], motion_speed=8.0), condition_frames=1, temporal=False)
        assert max_abs_error(out[:, :, 0], io["out"], "2D mode, condition_frames=1") <= tolerance
        # a scalar timestep serves the whole batch
        out = unet(sample[:1], io["timestep"][0], Conditioning(io["text"][:1], motion_speed=8.0), condition_frames=0,
                   temporal=False)
        assert max_abs_error(out[:, :, 0], io["out"][:1], "2D mode, scalar timestep") <= tolerance


def test_2d_mode_skips_every_temporal_layer():
    """With their gates opened the temporal layers change the output, except in 2D mode."""
    unet = sd_unet()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("temporal_weight"):
                p.fill_(0.5)  # initialised at 1e-5
    io = load_file(FIXTURES / "unet2d/io.safetensors")
    sample = io["sample"][:, :, None]
    with torch.no_grad():
        cond = Conditioning(io["text"], motion_speed=8.0)
        video = unet(sample, io["timestep"], cond, condition_frames=0)
        image = unet(sample, io["timestep"], cond, condition_frames=0, temporal=False)
    assert (video[:, :, 0] - io["out"]).abs().max() > 1e-2
    tolerance = rounding_tolerance(io["out"], reduction_depth(unet))
    assert max_abs_error(image[:, :, 0], io["out"], "2D mode with the temporal gates open") <= tolerance

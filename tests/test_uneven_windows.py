"""Windows of different lengths in one UNet call: the short one is padded, and with `lengths=` the
temporal layers see every window as if it were alone, so each real frame's prediction is unchanged.

The temporal layers are what make this matter (GroupNorm statistics over all frames of a window,
convolution and attention along time): a pad without `lengths` changes the real frames, which the
negative controls below show, so these tests raise the tiny models' temporal gates from their 1e-5
init to 0.5 to make the temporal layers count.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import max_abs_error, original_fixture_models, reduction_depth, rounding_tolerance
from musev_lite.pipeline import MuseVPipeline
from musev_lite.unet import Conditioning, ReferenceFeatures, UNet3D, UNet3DConfig

pytestmark = pytest.mark.filterwarnings("ignore:prompt truncated")  # the byte tokenizer makes V2 long


def open_temporal_gates(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if name.endswith("temporal_weight"):
            p.data.fill_(0.5)


def padded_vs_alone(unet, condition, frames, cond, lengths):
    """One padded call on windows of `lengths` new frames (cut from `frames`) vs one call per window."""
    longest = max(lengths)
    windows = [frames[:, :, :n] for n in lengths]
    alone = [unet(torch.cat([condition, w], 2).repeat(2, 1, 1, 1, 1), 500, cond, condition_frames=1) for w in windows]
    pads = [torch.cat([w, w[:, :, -1:].repeat(1, 1, longest - w.shape[2], 1, 1)], 2) for w in windows]
    sample = torch.cat([torch.cat([condition, p], 2) for p in pads]).repeat(2, 1, 1, 1, 1)  # [uncond; cond]
    real = [1 + n for n in lengths] * 2
    with_lengths = unet(sample, 500, cond.repeat(len(lengths)), condition_frames=1, lengths=real)
    without = unet(sample, 500, cond.repeat(len(lengths)), condition_frames=1)
    k = len(lengths)

    def rows(out, j):  # window j's uncond and cond rows, real frames only
        return torch.cat([out[j : j + 1, :, : 1 + lengths[j]], out[k + j : k + j + 1, :, : 1 + lengths[j]]])

    ref = torch.cat([a.flatten() for a in alone])
    return (torch.cat([rows(with_lengths, j).flatten() for j in range(k)]),
            torch.cat([rows(without, j).flatten() for j in range(k)]), ref)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "musev"])
def test_padded_call_equals_each_window_alone(preset):
    torch.manual_seed(0)
    cfg = UNet3DConfig.preset("tiny")
    if preset == "musev":  # the other architecture: a temporal transformer after conv_in, no ReferenceNet
        cfg = UNet3DConfig(block_out_channels=(32, 32, 32, 32), heads=2, norm_num_groups=16, cross_attention_dim=32,
                           temporal_conv_groups=16, transformer_in_groups=16)
    unet = UNet3D(cfg).eval()
    open_temporal_gates(unet)
    cond = Conditioning(torch.randn(2, 7, 32), motion_speed=8.0)
    if cfg.refer_fusion:
        cond.ip_tokens = torch.randn(2, 4, 32)
        down = [torch.randn(2, 32, s, s) for s in [16] * 3 + [8] * 3 + [4] * 3 + [2] * 3]
        cond.refer = ReferenceFeatures(down, torch.randn(2, 32, 2, 2))
    # 16x16 latents: at 8x8 the mid block is 1x1 and its GroupNorms (2 values per group) blow rounding
    # differences of batch-size-dependent kernels (1e-7) up to 1e-2, padded or not
    condition, frames = torch.randn(1, 4, 1, 16, 16), torch.randn(1, 4, 6, 16, 16)
    with torch.no_grad():
        padded, naive, alone = padded_vs_alone(unet, condition, frames, cond, [6, 3, 6, 1])
    tolerance = rounding_tolerance(alone, reduction_depth(unet))  # another batch: rounding through the UNet
    assert max_abs_error(padded, alone, f"{preset}: padded with lengths vs alone") <= tolerance
    assert max_abs_error(naive, alone, f"{preset}: padded without lengths vs alone") > 1e-2  # the pad matters


@pytest.mark.slow
def test_padded_call_equals_each_window_alone_original_weights(shared):
    """The original's fixture UNets (temporal gates 0.3-0.7) on frames of the t13 run, windows of 8 and 3
    (the loop with its own 12 + 5 windows batched is tests/test_loop_parity.py's t13 case)."""
    for variant in ("musev", "musev_referencenet"):
        unet = original_fixture_models(shared, variant)[0]
        tensors = load_file(shared / f"reference/fixtures/{variant}/t13_linspace3.safetensors")
        cond = Conditioning(tensors["text.prompt_embeds"], motion_speed=8.0)
        if variant == "musev_referencenet":
            cond.ip_tokens = tensors["ip.image_emb"]
            down = [tensors[f"refnet.down_block_refer_embs.{i}"].squeeze(2) for i in range(12)]
            cond.refer = ReferenceFeatures(down, tensors["refnet.mid_block_refer_emb"].squeeze(2))
        frames = tensors["latents.x_T"][:, :, :8] / 14.6  # scaled to the UNet's input range at sigma_max
        with torch.no_grad():
            padded, naive, alone = padded_vs_alone(unet, tensors["cond.condition_latents"], frames, cond, [8, 3])
        tolerance = rounding_tolerance(alone, reduction_depth(unet))  # another batch: rounding through the UNet
        assert max_abs_error(padded, alone, f"{variant}: padded with lengths vs alone") <= tolerance
        assert max_abs_error(naive, alone, f"{variant}: padded without lengths vs alone") > 1e-1


def test_lengths_are_checked():
    unet = UNet3D(UNet3DConfig.preset("tiny")).eval()
    sample, cond = torch.zeros(2, 4, 5, 8, 8), Conditioning(torch.zeros(2, 7, 32), motion_speed=8.0)
    for bad in ([5], [5, 6], [5, 0]):
        with pytest.raises(ValueError, match="lengths must give each of the B=2 samples"):
            unet(sample, 500, cond, lengths=bad)


@pytest.mark.slow
def test_uneven_windows_share_one_call_and_give_the_same_video():
    """The tiny pipeline, 9 frames in windows of 4, 4, 4 and 3: one UNet call per step with
    window_batch 8, four with window_batch 1, the same latents (to the rounding of 2 steps through the UNet,
    conftest.rounding_tolerance, where a pad without `lengths` is off by their magnitude) and frames (to 1
    level, where rounding meets the truncation to uint8). 96x96 for the reason given above."""
    pipe = MuseVPipeline.demo(seed=0)
    open_temporal_gates(pipe.unet)
    image = np.random.default_rng(0).integers(0, 255, (96, 96, 3)).astype(np.uint8)
    runs = {}
    for window_batch in (1, 8):
        calls = []
        runs[window_batch] = pipe("a face", image=image, num_frames=9, seed=3, steps=2, context_frames=4,
                                  context_overlap=2, window_batch=window_batch,
                                  callback=lambda p: calls.append(p.unet_calls) if p.stage == "video" else None)
        assert calls == [4 if window_batch == 1 else 1] * 2
    tolerance = rounding_tolerance(runs[1].latents, 2 * reduction_depth(pipe.unet))
    assert max_abs_error(runs[8].latents, runs[1].latents, "tiny pipeline, window_batch 8 vs 1") <= tolerance
    assert np.abs(runs[8].frames.astype(int) - runs[1].frames).max() <= 1

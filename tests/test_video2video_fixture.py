"""The video2video fixture (tests/fixtures/video2video, a run of the ORIGINAL MuseV predictor with a tiny
ControlNet, made by tests/make_fixtures.py: make_video2video) is consistent with itself: shapes, one ControlNet
call per window and step with the control frames [condition's] + window's, the ControlNet weights it names,
the initial latents and the Euler steps it implies. The parity test against musev_lite builds on these files.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error, rounding_tolerance
from make_fixtures import crop_resize_frames, seeded_weights, tensors_sha256

ROOT = FIXTURES / "video2video"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
INPUTS = load_file(ROOT / "inputs.safetensors")
CASES = list(MANIFEST["cases"])


def control_frames() -> torch.Tensor:
    """The control video as the predictor saw it, (3, t, 128, 192) uint8: tiles -> raw frames -> crop-resize."""
    tiles = INPUTS["control_video_tiles"]
    scale = 128 // tiles.shape[1]
    raw = tiles.repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (t, h, w, c) as decord gives it
    return crop_resize_frames(raw.permute(3, 0, 1, 2), 128, 192)


@pytest.mark.parametrize("case", CASES)
def test_shapes(case):
    meta, tensors = MANIFEST["cases"][case], load_file(ROOT / f"{case}.safetensors")
    assert {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()} == \
        {k: [v["shape"], v["dtype"]] for k, v in meta["tensors"].items()}
    frames = MANIFEST["video"]["frames"] - 1  # control frame 0 belongs to the condition image
    latent = (1, 4, frames, 16, 24)
    assert tensors["latents.x_T"].shape == latent and tensors["final.latents"].shape == (1, 4, frames + 1, 16, 24)
    assert [tensors[f"steps.{i}.noise_pred_guided"].shape for i in range(len(meta["timesteps"]))] == [latent] * 2
    assert INPUTS["cond.condition_latents"].shape == (1, 4, 1, 16, 24) and INPUTS["text.prompt_embeds"].shape == (2, 154, 32)
    assert sorted({f for window in meta["windows"] for f in window}) == list(range(frames))


@pytest.mark.parametrize("case", CASES)
def test_one_controlnet_call_per_window_and_step(case):
    meta = MANIFEST["cases"][case]
    calls, windows = meta["controlnet_calls"], meta["windows"]
    assert len(calls) == len(meta["unet_calls"]) == len(windows) * len(meta["timesteps"])
    assert [(c["step"], c["window"]) for c in calls] == [(s, w) for s in range(len(meta["timesteps"])) for w in range(len(windows))]
    for call, unet in zip(calls, meta["unet_calls"]):
        window = windows[call["window"]]
        rows = 2 * (len(window) + 1)  # both guidance halves, the condition frame first in each
        assert call["frames"] == unet["frames"] == window
        assert call["sample_shape"] == [rows, 4, 16, 24] and unet["sample_shape"] == [2, 4, len(window) + 1, 16, 24]
        assert call["encoder_hidden_states_shape"] == [rows, 154, 32] and call["controlnet_cond_shape"] == [rows, 3, 128, 192]
        assert call["timestep"] == unet["timestep"] == meta["timesteps"][call["step"]]
        assert call["control_frames"] == ([0] + [1 + f for f in window]) * 2
        assert call["conditioning_scale"] == 1.0 and call["guess_mode"] is False
        sizes = [(16, 24)] * 3 + [(8, 12)] * 3 + [(4, 6)] * 3 + [(2, 3)] * 4  # 12 skips + mid
        assert call["residual_shapes"] == [[rows, 32, *hw] for hw in sizes]
        assert unet["sample_index"] == list(range(1, len(window) + 1)) and unet["vision_conditon_frames_sample_index"] == [0]


@pytest.mark.parametrize("case", CASES)
def test_control_frames_reach_the_controlnet(case):
    """The recorded per-row sums of every controlnet_cond are those of [frame 0] + frames 1 + window, /255 in
    float32 as the original's prepare_image does (P:87-138; no normalisation for control images)."""
    frames = control_frames()
    assert tensors_sha256({"control_video": frames}) == MANIFEST["video"]["crop_resized_sha256"]["control_video"]
    meta = MANIFEST["cases"][case]
    for call in meta["controlnet_calls"]:
        window = meta["windows"][call["window"]]
        picked = frames[:, ([0] + [1 + f for f in window]) * 2].transpose(0, 1).float() / 255
        sums = torch.tensor(call["controlnet_cond_row_sums"], dtype=torch.float64)
        what = f"{case} step {call['step']} window {window} control row sums"
        # float64 sums of the same float32 values in another order: a sum of n terms in any order is off by at
        # most n * u * (the sum of their sizes) (Higham's bound for recursive summation; the values are >= 0)
        tolerance = 2 * picked[0].numel() * torch.finfo(torch.float64).eps / 2 * sums.max().item()
        assert max_abs_error(picked.double().flatten(1).sum(1), sums, what) <= tolerance


def test_controlnet_weights_rebuild():
    net = MANIFEST["controlnet"]
    weights = seeded_weights(net["init_spec"], net["seed"])
    assert tensors_sha256(weights) == net["sha256"]
    zero_convs = [v for k, v in weights.items() if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))
                  and k.endswith(".weight")]
    assert len(zero_convs) == 13 and min(v.float().abs().mean() for v in zero_convs) > 0.01  # random, not zero


@pytest.mark.parametrize("case", CASES)
def test_initial_latents_and_euler_steps(case):
    """x_T from the seed as the original draws it (video_fusion_noise: common then individual draw), and the
    returned latents = condition latent, then x_T moved by the two Euler steps of the recorded guided eps."""
    meta, tensors = MANIFEST["cases"][case], load_file(ROOT / f"{case}.safetensors")
    x_t, cond, sigmas = tensors["latents.x_T"], INPUTS["cond.condition_latents"], meta["sigmas"]
    generator = torch.Generator().manual_seed(1000)
    common = torch.randn((1, 4, 1, 16, 24), generator=generator)
    individual = torch.randn(x_t.shape, generator=generator)
    half = torch.tensor(0.5)
    noise = torch.sqrt(1 - half) * common + torch.sqrt(half) * individual
    if case == "video_middle":  # image-based video noise: a 1e-3 share of the condition latent, scaled by sigma_0
        expected = (1e-3**0.5 * cond.expand_as(x_t) + (1 - 1e-3) ** 0.5 * noise) * meta["init_noise_sigma"]
        assert max_abs_error(x_t, expected, "x_T from the seed") <= rounding_tolerance(x_t, 7)  # 7 roundings
    else:  # VAE latents of RGB frames 1..5 plus sigma_0 noise: what is left is latent-sized (the condition
        # latent, from the same tiny VAE, has |x| <= 0.52), not noise-sized (sigma_0 = 14.6)
        assert (x_t - sigmas[0] * noise).abs().max() < 1
    x = x_t
    for i in range(len(meta["timesteps"])):
        x = x + (sigmas[i + 1] - sigmas[i]) * tensors[f"steps.{i}.noise_pred_guided"]
    assert torch.equal(tensors["final.latents"][:, :, :1], cond)
    # x + (sigma_next - sigma) eps and the scheduler's x0 / derivative form: 5 roundings a step
    reference = tensors["final.latents"][:, :, 1:]
    assert max_abs_error(x, reference, f"{case} Euler steps") <= rounding_tolerance(reference, 5 * len(meta["timesteps"]))


def test_shared_inputs_unchanged(shared):
    """The fixture names inputs and models of ../shared; they must still be the ones it ran with."""
    run = load_file(shared / "reference/fixtures/musev_referencenet/t13_linspace3.safetensors")
    for key, digest in MANIFEST["shared_inputs"].items():
        assert tensors_sha256({key: run[key]}) == digest, key
    # two runs of the original's projection (one linear layer and a LayerNorm: 3 reductions) on the same embedding
    reference = run["ip.image_emb"]
    assert max_abs_error(INPUTS["ip.image_emb"], reference, "IP tokens vs the shared run") <= rounding_tolerance(reference, 3)

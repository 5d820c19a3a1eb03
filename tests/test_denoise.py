"""The parallel-denoising loop's parts: windows, starting noise, guidance, and batched windows."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import max_abs_error, rounding_tolerance
from musev_lite.denoise import (
    ImageDenoiser,
    WindowCall,
    WindowedDenoiser,
    context_windows,
    guidance_scales,
    initial_latents,
    sample,
    window_groups,
)
from musev_lite.samplers import EulerSampler, SchedulerConfig
from musev_lite.unet import Conditioning, ReferenceFeatures


def test_windows_equal_the_original(shared):
    records = json.loads((shared / "reference/fixtures/windows.json").read_text())["records"]
    assert len(records) >= 24
    for r in records:
        ours = context_windows(r["context_schedule"], r["num_frames"], r["context_frames"], r["context_overlap"])
        assert ours == r["windows"], (r["context_schedule"], r["num_frames"])


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="context_schedule 'sliding' is unknown"):
        context_windows("sliding", 20)
    with pytest.raises(ValueError, match=r"context_overlap \(12\) must be"):
        context_windows("uniform_v2", 20, 12, 12)


@pytest.mark.parametrize("variant", ["musev", "musev_referencenet"])
@pytest.mark.parametrize("run", ["t20_linspace", "t20_leading", "t13_linspace3"])
def test_initial_latents_equal_the_original(shared, variant, run):
    fixtures = shared / "reference/fixtures"
    tensors = load_file(fixtures / variant / f"{run}.safetensors")
    manifest = json.loads((fixtures / "manifest.json").read_text())
    init_sigma = manifest["variants"][variant]["runs"][run]["init_noise_sigma"]
    assert manifest["seed_offsets"]["generator"] == 1000
    generator = torch.Generator("cpu").manual_seed(1000)
    x_t = initial_latents(
        tensors["latents.x_T"].shape, generator, init_sigma, 0.5, tensors["cond.condition_latents"], 1e-3
    )
    replay = torch.Generator("cpu").manual_seed(1000)
    assert torch.equal(torch.randn(tensors["noise.draw0"].shape, generator=replay), tensors["noise.draw0"])
    assert torch.equal(torch.randn(tensors["noise.draw1"].shape, generator=replay), tensors["noise.draw1"])
    # from the recorded draws and condition latent: 7 roundings (two mixes, the image weight, sigma)
    assert max_abs_error(x_t, tensors["latents.x_T"], f"{variant}/{run} x_T") <= rounding_tolerance(tensors["latents.x_T"], 7)


@pytest.mark.parametrize("run", ["t20_linspace", "t13_linspace3"])
def test_generator_continues_as_in_the_original(shared, run):
    """After x_T and the loop, the seeded generator is where the original's is: its recorded draws are
    VideoFusion's two in prepare_latents, then two per Euler step that the step never uses."""
    fixtures = shared / "reference/fixtures"
    meta = json.loads((fixtures / "manifest.json").read_text())["variants"]["musev"]["runs"][run]
    tensors = load_file(fixtures / "musev" / f"{run}.safetensors")
    replay = torch.Generator("cpu").manual_seed(1000)
    for draw in meta["rng_draws"]:
        torch.randn(draw["shape"], generator=replay)
    generator = torch.Generator("cpu").manual_seed(1000)
    x_t = initial_latents(tensors["latents.x_T"].shape, generator, meta["init_noise_sigma"], 0.5,
                          tensors["cond.condition_latents"], 1e-3)
    sampler = EulerSampler(SchedulerConfig.from_dict(meta["checkpoint_scheduler_config"]), len(meta["step_timesteps"]),
                           noise_type="video_fusion")
    windows = context_windows("uniform_v2", x_t.shape[2], 12, 4)
    cond = Conditioning(torch.zeros(2, 77, 8), motion_speed=8.0)
    zero_unet = lambda unet_input, *a, **k: torch.zeros_like(unet_input)  # noqa: E731
    denoiser = WindowedDenoiser(zero_unet, x_t, tensors["cond.condition_latents"], cond, sampler, windows,
                                [3.5] * len(sampler.timesteps))
    sample(denoiser, sampler, x_t, generator)
    assert len(meta["rng_draws"]) == 2 + 2 * len(sampler.timesteps)
    assert torch.equal(generator.get_state(), replay.get_state())


def test_guidance_schedules():
    assert guidance_scales(3.5, 4) == [3.5] * 4
    assert guidance_scales(7.0, 5, 3.0, "linear") == pytest.approx([7.0, 6.0, 5.0, 4.0, 3.0])
    assert guidance_scales(7.0, 5, 3.0, "two_stage") == [7.0, 7.0, 3.0, 3.0, 3.0]
    assert guidance_scales(7.0, 7, 3.0, "three_stage") == [7.0, 7.0, 5.0, 5.0, 3.0, 3.0, 3.0]
    assert guidance_scales(7.0, 5, 3.0, "fix_two_stage") == [7.0, 7.0, 7.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="guidance_method 'cosine'"):
        guidance_scales(7.0, 5, 3.0, "cosine")


def test_window_groups():
    windows = context_windows("uniform_v2", 25, 12, 4)  # 12, 12, 9 frames
    assert window_groups(windows, 4) == [windows]  # uneven windows share a call too
    assert window_groups(windows, 2) == [windows[:2], windows[2:]]
    assert [len(g) for g in window_groups(windows, 1)] == [1, 1, 1]
    with pytest.raises(ValueError, match="window_batch must be >= 1"):
        window_groups(windows, 0)


def test_conditioning_repeat_layout():
    x = torch.tensor([[0.0], [1.0]])  # [uncond; cond]
    assert Conditioning(x, motion_speed=8.0).repeat(3).text.flatten().tolist() == [0, 0, 0, 1, 1, 1]
    pair = Conditioning(x, motion_speed=8.0, ip_tokens=x, refer=ReferenceFeatures([x], x)).repeat(2)
    assert pair.ip_tokens.flatten().tolist() == [0, 0, 1, 1] and pair.refer.down[0].flatten().tolist() == [0, 0, 1, 1]
    assert pair.refer.mid.flatten().tolist() == [0, 0, 1, 1] and pair.motion_speed == 8.0


class Recorder:
    """A stand-in UNet: a fixed non-linear function of every input, recording what it saw."""

    def __init__(self):
        self.calls = []
        torch.manual_seed(0)
        self.mix = torch.randn(4, 4)

    def __call__(self, sample, t, cond, condition_frames, temporal=True, lengths=None):
        text, extra = cond.text, cond.ip_tokens.flatten()
        self.calls.append((sample.clone(), text.clone(), extra.clone(), lengths))
        b, c, f, h, w = sample.shape
        frames = torch.arange(f, dtype=sample.dtype).view(1, 1, f, 1, 1)
        out = torch.einsum("dc,bcfhw->bdfhw", self.mix, sample).tanh()
        # couples the frames of a window, as the temporal layers do: over its real frames only
        window_mean = torch.stack([sample[i, :, :n].mean() for i, n in enumerate(lengths or [f] * b)]).view(b, 1, 1, 1, 1)
        text_term = 1e-3 * text.sum(dim=(1, 2)).view(b, 1, 1, 1, 1)
        return out + 0.1 * frames + window_mean + text_term + extra.view(b, 1, 1, 1, 1)


# Roundings in one step of the loop with the stand-in UNet below: its ~6 ops, the window average, guidance
# and the sampler step (conftest.rounding_tolerance).
STEP_ROUNDINGS = 13


class HalfSampler:
    """Stand-in sampler with the interface of musev_lite.samplers."""

    timesteps = torch.tensor([900.0, 500.0, 100.0])

    def scale_model_input(self, x, i):
        return x / (i + 2.0)

    def step(self, noise, i, x, generator=None):
        return x - 0.3 * noise


def run_loop(window_batch):
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 25, 2, 3)
    condition = torch.randn(1, 4, 1, 2, 3)
    text = torch.randn(2, 5, 8)
    extra = torch.tensor([0.25, -0.5])
    unet = Recorder()
    windows = context_windows("uniform_v2", 25, 12, 4)
    cond = Conditioning(text, motion_speed=8.0, ip_tokens=extra.view(2, 1, 1))
    denoiser = WindowedDenoiser(unet, latents, condition, cond, HalfSampler(), windows, [3.5, 3.0, 2.5],
                                window_batch=window_batch)
    out = sample(denoiser, HalfSampler(), latents)
    return out, unet, latents, condition, text, denoiser


def test_batched_windows_equal_one_at_a_time():
    one, unet_one, *_, denoiser_one = run_loop(1)
    many, unet_many, *_, denoiser_many = run_loop(8)
    assert (denoiser_one.calls_per_step, denoiser_many.calls_per_step) == (3, 1)  # 12, 12 and 9 frames in one call
    assert len(unet_one.calls) == 3 * 3 and len(unet_many.calls) == 3 * 1  # 3 steps of them
    assert [call[3] for call in unet_one.calls] == [None] * 9  # nothing padded
    assert unet_many.calls[0][3] == [13, 13, 10] * 2  # the 9-frame window padded, both halves
    # another batch size in the stand-in UNet: ~13 roundings a step (its ~6 ops, the average, guidance, the step)
    assert max_abs_error(many, one, "batched vs unbatched windows") <= rounding_tolerance(one, 3 * STEP_ROUNDINGS)


def test_every_window_sees_the_clean_condition_frame_first():
    _, unet, latents, condition, text, _ = run_loop(8)
    sample, seen_text, extra, _ = unet.calls[0]  # step 0, all three windows together
    assert sample.shape == (6, 4, 13, 2, 3)  # [uncond w0, w1, w2, cond w0, w1, w2]
    for row in range(6):
        assert torch.equal(sample[row, :, :1], condition[0])  # unscaled, both halves
    assert torch.equal(sample[0, :, 1:], latents[0, :, 0:12] / 2.0)  # scale_model_input(step 0)
    assert torch.equal(sample[4, :, 1:], latents[0, :, 8:20] / 2.0)
    assert torch.equal(sample[5, :, 1:10], latents[0, :, 16:25] / 2.0)  # the short window, then padding
    assert torch.equal(seen_text[2], text[0]) and torch.equal(seen_text[3], text[1])
    assert extra.tolist() == [0.25] * 3 + [-0.5] * 3


def test_overlap_is_a_flat_average():
    """One step by hand: frames covered twice get the mean of both windows' predictions."""
    torch.manual_seed(2)
    latents = torch.randn(1, 4, 20, 2, 3)
    condition = torch.randn(1, 4, 1, 2, 3)
    text = torch.randn(2, 5, 8)
    extra = torch.zeros(2)
    unet = Recorder()

    class OneStep(HalfSampler):
        timesteps = torch.tensor([500.0])

    windows = context_windows("uniform_v2", 20, 12, 4)  # [0..11], [8..19]
    cond = Conditioning(text, motion_speed=8.0, ip_tokens=extra.view(2, 1, 1))
    out = sample(WindowedDenoiser(unet, latents, condition, cond, OneStep(), windows, [2.0]), OneStep(), latents)
    preds = []
    for window in windows:
        x = latents[:, :, window] / 2.0
        window_input = torch.cat([torch.cat([condition, x], 2)] * 2)
        preds.append(Recorder()(window_input, 0, cond, 1)[:, :, 1:])
    expected = torch.zeros(2, 4, 20, 2, 3)
    expected[:, :, :8] = preds[0][:, :, :8]
    expected[:, :, 8:12] = (preds[0][:, :, 8:] + preds[1][:, :, :4]) / 2
    expected[:, :, 12:] = preds[1][:, :, 4:]
    guided = expected[:1] + 2.0 * (expected[1:] - expected[:1])
    expected = latents - 0.3 * guided
    assert max_abs_error(out, expected, "one step by hand") <= rounding_tolerance(expected, STEP_ROUNDINGS)


def test_window_calls_are_worked_out_once():
    """Each UNet call of a step is a fixed record: its windows, the same padded to one length, the UNet's
    `lengths=` when they are uneven (condition frame + real frames, per sample, both halves), the frame indices."""
    windows = context_windows("uniform_v2", 25, 12, 4)  # 12, 12, 9 frames
    latents, condition = torch.zeros(2, 4, 25, 2, 3), torch.zeros(2, 4, 1, 2, 3)  # batch 2
    cond = Conditioning(torch.zeros(4, 5, 8), motion_speed=8.0)
    [call] = WindowedDenoiser(Recorder(), latents, condition, cond, HalfSampler(), windows, [1.0] * 3, 8).calls
    assert call.windows == windows and call.padded == windows[:2] + [windows[2] + [24] * 3]
    assert call.lengths == [13, 13, 13, 13, 10, 10] * 2
    assert [index.tolist() for index in call.indices] == windows
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.lengths = None
    calls = WindowedDenoiser(Recorder(), latents, condition, cond, HalfSampler(), windows, [1.0] * 3, 2).calls
    assert [c.windows for c in calls] == window_groups(windows, 2) and [c.lengths for c in calls] == [None, None]
    short = WindowCall.of([[0, 1, 2], [3]], batch=1, condition_frames=1, device="cpu")
    assert short.padded == [[0, 1, 2], [3, 3, 3]] and short.lengths == [4, 2] * 2


def test_sample_runs_the_steps_from_start_with_the_callback():
    """The loop: from step `start`, the denoiser's prediction for the current x, the sampler step with the
    generator, the callback with the new x."""
    seen, called = [], []
    generator = torch.Generator().manual_seed(0)

    class Stepper(HalfSampler):
        timesteps = torch.tensor([900.0, 600.0, 300.0, 100.0])

        def step(self, noise, i, x, generator=None):
            assert generator is not None
            return x + noise

    def denoiser(x, i):
        seen.append((i, x.item()))
        return torch.tensor(10.0**i)

    out = sample(denoiser, Stepper(), torch.tensor(0.5), generator, start=1,
                 callback=lambda i, x: called.append((i, x.item())))
    assert seen == [(1, 0.5), (2, 10.5), (3, 110.5)]
    assert called == [(1, 10.5), (2, 110.5), (3, 1110.5)] and out.item() == 1110.5


def test_image_denoiser_is_one_2d_call_on_both_halves():
    """The first frame: one UNet call on [x; x] scaled by the sampler, no condition frame, temporal layers off,
    and classifier-free guidance of its two halves."""
    calls = []

    def unet(sample, t, cond, condition_frames, temporal=True, lengths=None):
        calls.append((sample.clone(), t, cond, condition_frames, temporal, lengths))
        return torch.cat([sample[:1] * 2, sample[1:] * 5])  # uncond 2 x, cond 5 x

    cond = Conditioning(torch.zeros(2, 5, 8), motion_speed=8.0)
    x = torch.randn(1, 4, 1, 2, 3)
    denoiser = ImageDenoiser(unet, cond, HalfSampler(), [7.5, 3.0, 1.0])
    noise = denoiser(x, 1)
    [(seen, t, seen_cond, condition_frames, temporal, lengths)] = calls
    assert torch.equal(seen, torch.cat([x, x]) / 3.0) and t == 500.0 and seen_cond is cond
    assert (condition_frames, temporal, lengths, denoiser.calls_per_step) == (0, False, None, 1)
    expected = x / 3.0 * (2 + 3.0 * (5 - 2))
    assert max_abs_error(noise, expected, "guided 2D prediction") <= rounding_tolerance(expected, STEP_ROUNDINGS)

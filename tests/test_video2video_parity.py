"""Video2video against the ORIGINAL MuseV (tests/fixtures/video2video, made by tests/make_fixtures.py from
the original's predictor and pipeline with a tiny random ControlNet; the UNet, ReferenceNet and IP tokens are
the shared musev_referencenet fixture's). From the recorded x_T, text, IP tokens and control video, our loop
with our ControlNet must give the original's guided noise per step and final latents (up to ~100), for
`video_middle` (control video only) and `video` (RGB init + control), one window per call and with
`window_batch` 2. Tolerance: 8x how far the original's run moved with another attention kernel (its manifest,
conftest.spread_tolerance): about 1.2e-4 on the noise, 1.1e-3 on the final latents.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, SHARED, max_abs_error, original_fixture_models, rounding_tolerance, spread_tolerance
from make_fixtures import seeded_weights
from musev_lite.controlnet import ControlNet, ControlNetConfig, MultiControlNet
from musev_lite.denoise import (
    WindowControl,
    WindowedDenoiser,
    context_windows,
    initial_latents,
    sample,
    window_groups,
)
from musev_lite.pipeline import MuseVPipeline
from musev_lite.plan import ControlVideo, fitted_videos, make_plan
from musev_lite.samplers import SD15_SCHEDULER, EulerSampler, SchedulerConfig, video_fusion_noise
from musev_lite.settings import GenerationConfig
from musev_lite.unet import Conditioning
from musev_lite.vae import AutoencoderKL, VAEConfig
from musev_lite.video_io import crop_resize
from musev_lite.weights import CONTROLNET, config_from_dict, load_weights, read_state_dict

ROOT = FIXTURES / "video2video"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
INPUTS = load_file(ROOT / "inputs.safetensors")


def raw_frames(name: str) -> torch.Tensor:
    """(t, 128, 192, 3) uint8 as a video reader gives them: each stored pixel repeated 8x8."""
    tiles = INPUTS[f"{name}_tiles"]
    return tiles.repeat_interleave(8, 1).repeat_interleave(8, 2)


def control_video() -> torch.Tensor:
    """Our crop-resize of the raw control frames, (t, 128, 192, 3) uint8 (the original's, bit for bit)."""
    return torch.stack([torch.from_numpy(crop_resize(f.numpy(), 128, 192)) for f in raw_frames("control_video")])


@pytest.fixture(scope="module")
def models():
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"reference material not found at {SHARED} (it sits beside the checkout in CI)")
    unet, referencenet = original_fixture_models(SHARED, "musev_referencenet")
    spec = MANIFEST["controlnet"]
    net = ControlNet(ControlNetConfig.from_diffusers(spec["config"])).eval()
    weights = {k: v.float() for k, v in seeded_weights(spec["init_spec"], spec["seed"]).items()}
    load_weights(net, weights, "the fixture's seeded ControlNet")
    return unet, referencenet, net


@pytest.mark.slow
@pytest.mark.parametrize("window_batch", [1, 2])
@pytest.mark.parametrize("case", ["video_middle", "video"])
def test_video2video_loop_equals_the_original(models, case, window_batch):
    unet, referencenet, net = models
    meta, tensors = MANIFEST["cases"][case], load_file(ROOT / f"{case}.safetensors")
    kwargs = meta["pipeline_call_kwargs"]
    windows = context_windows(kwargs["context_schedule"], kwargs["video_length"], kwargs["context_frames"],
                              kwargs["context_overlap"])
    assert windows == meta["windows"]
    sampler = EulerSampler(SchedulerConfig.from_dict(SD15_SCHEDULER), kwargs["num_inference_steps"], "video_fusion")
    assert sampler.timesteps.tolist() == meta["timesteps"] and sampler.init_noise_sigma == meta["init_noise_sigma"]
    ip_tokens = INPUTS["ip.image_emb"]
    with torch.no_grad():
        refer = referencenet(INPUTS["refnet.refer_latent"].repeat(2, 1, 1, 1), 0.0, ip_tokens)
    # motion_speed as a call without it gets it: MuseV's video2video passes its sample rate (1), not 8
    rgb = raw_frames("rgb_video").numpy() if case == "video" else None
    plan = make_plan(GenerationConfig(), None, rgb, [ControlVideo(control_video().numpy())],
                     INPUTS["cond.condition_latents"], [CONTROLNET])[0]
    assert plan.config.motion_speed == kwargs["motion_speed"] == 1
    cond = Conditioning(INPUTS["text.prompt_embeds"], motion_speed=plan.config.motion_speed, ip_tokens=ip_tokens,
                        ip_scale=kwargs["ip_adapter_scale"], refer=refer)
    control = WindowControl(MultiControlNet([net]), [control_video()], [kwargs["controlnet_conditioning_scale"]],
                            kwargs["control_guidance_start"], kwargs["control_guidance_end"])
    guided, calls = [], []

    class Recording(EulerSampler):
        def step(self, noise, i, x, generator=None):
            guided.append(noise)
            return super().step(noise, i, x, generator)

    sampler.__class__ = Recording
    counting = lambda *args, **kw: calls.append(1) or unet(*args, **kw)  # noqa: E731
    denoiser = WindowedDenoiser(counting, tensors["latents.x_T"], INPUTS["cond.condition_latents"], cond, sampler,
                                windows, meta["guidance"], window_batch, control=control)
    with torch.no_grad():
        latents = sample(denoiser, sampler, tensors["latents.x_T"])
    assert denoiser.calls_per_step == len(window_groups(windows, window_batch))
    assert len(calls) == len(meta["timesteps"]) * denoiser.calls_per_step
    spread = meta["determinism"]["math_attention_not_sdpa"]  # the original's run with another attention kernel
    eps_tolerance = spread_tolerance(max(spread[f"steps.{i}.noise_pred_guided"] for i in range(len(guided))))
    for i, noise in enumerate(guided):
        assert max_abs_error(noise, tensors[f"steps.{i}.noise_pred_guided"], f"{case} eps {i}") <= eps_tolerance
    final = torch.cat([INPUTS["cond.condition_latents"], latents], dim=2)
    tolerance = spread_tolerance(spread["final.latents"])
    assert max_abs_error(final, tensors["final.latents"], f"{case} final latents") <= tolerance


def test_video_middle_starting_noise_is_the_original():
    """x_T of `video_middle` is t2v's: VideoFusion noise from the seeded generator, nudged to the image."""
    tensors = load_file(ROOT / "video_middle.safetensors")
    generator = torch.Generator().manual_seed(1000)
    x_t = initial_latents(tensors["latents.x_T"].shape, generator, MANIFEST["cases"]["video_middle"]["init_noise_sigma"],
                          0.5, INPUTS["cond.condition_latents"], 1e-3)
    # from the recorded condition latent and the seeded draws: 7 roundings (two mixes, the image weight, sigma)
    assert max_abs_error(x_t, tensors["latents.x_T"], "video_middle x_T") <= rounding_tolerance(tensors["latents.x_T"], 7)


def test_video_starting_latents_are_the_original(models):
    """x_T of `video`: the VAE latents of RGB frames 1.. (our crop-resize, our VAE with the fixture's
    weights) noised to the first step with the seeded VideoFusion noise, no image-based nudge."""
    root = SHARED / "reference/fixtures/musev_referencenet/vae"
    vae = AutoencoderKL(config_from_dict(VAEConfig, json.loads((root / "config.json").read_text()))).eval()
    load_weights(vae, {k: v.float() for k, v in read_state_dict(root / "diffusion_pytorch_model.safetensors").items()},
                 "the fixture's VAE")
    unet, _, _ = models
    pipe = MuseVPipeline(unet, vae, None, None, SchedulerConfig.from_dict(SD15_SCHEDULER))
    rgb, _ = fitted_videos(raw_frames("rgb_video"), [], 128, 192)
    init = pipe.encode_frames(rgb[1:])
    sampler = EulerSampler(SchedulerConfig.from_dict(SD15_SCHEDULER), 2, "video_fusion")
    noise = video_fusion_noise(init.shape, torch.Generator().manual_seed(1000), 0.5)
    tensors = load_file(ROOT / "video.safetensors")
    tolerance = spread_tolerance(MANIFEST["cases"]["video"]["determinism"]["math_attention_not_sdpa"]["latents.x_T"])
    assert max_abs_error(sampler.add_noise(init, noise, 0), tensors["latents.x_T"], "video x_T") <= tolerance

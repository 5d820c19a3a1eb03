"""The whole parallel-denoising loop against the ORIGINAL MuseV pipeline run (../shared fixtures).

From the recorded x_T, condition latent, text (and IP tokens, ReferenceNet features), our loop with
our Euler must give the original's guided noise per step and latents (of magnitude up to ~100), one
window per call and with windows batched. Tolerance: 8x how far the original's own run moved when only
its attention kernel was swapped (conftest.spread_tolerance), about 1e-4 on the noise, 1.2e-3 on the latents.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, max_abs_error, original_fixture_models, spread_tolerance
from musev_lite.denoise import WindowedDenoiser, context_windows, sample
from musev_lite.samplers import EulerSampler, SchedulerConfig
from musev_lite.unet import Conditioning, ReferenceFeatures

pytestmark = pytest.mark.slow  # every case runs the whole loop


@pytest.fixture(scope="module")
def unets():
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"reference material not found at {SHARED} (it sits beside the checkout in CI)")
    return {v: original_fixture_models(SHARED, v)[0] for v in ("musev", "musev_referencenet")}


CASES = [(v, r, 4) for v in ("musev", "musev_referencenet") for r in ("t20_linspace", "t20_leading", "t13_linspace3")]


@pytest.mark.parametrize("variant, run, window_batch", CASES + [("musev_referencenet", "t20_linspace", 1)])
def test_loop_equals_the_original(shared, unets, variant, run, window_batch):
    fixtures = shared / "reference/fixtures"
    meta = json.loads((fixtures / "manifest.json").read_text())["variants"][variant]["runs"][run]
    tensors = load_file(fixtures / variant / f"{run}.safetensors")
    x_t = tensors["latents.x_T"]
    windows = context_windows("uniform_v2", x_t.shape[2], 12, 4)
    assert windows == meta["windows"]
    sampler = EulerSampler(SchedulerConfig.from_dict(meta["checkpoint_scheduler_config"]), len(meta["step_timesteps"]))
    cond = Conditioning(tensors["text.prompt_embeds"], motion_speed=8.0)
    if variant == "musev_referencenet":
        down = [tensors[f"refnet.down_block_refer_embs.{i}"].squeeze(2) for i in range(12)]
        cond.ip_tokens = tensors["ip.image_emb"]
        cond.refer = ReferenceFeatures(down, tensors["refnet.mid_block_refer_emb"].squeeze(2))
    guided = []

    class Recording(EulerSampler):
        def step(self, noise, i, x, generator=None):
            guided.append(noise)
            return super().step(noise, i, x)

    sampler.__class__ = Recording
    steps = []
    denoiser = WindowedDenoiser(unets[variant], x_t, tensors["cond.condition_latents"], cond, sampler, windows,
                                [3.5] * len(sampler.timesteps), window_batch=window_batch)
    with torch.no_grad():
        latents = sample(denoiser, sampler, x_t, callback=lambda i, x: steps.append(x))
    # how far the original's own run moved with another attention kernel, over all steps (manifest)
    spread = meta["determinism"]["rerun_math_attention_by_group"]
    eps_tolerance = spread_tolerance(max(spread[f"steps.{i}.noise_pred_guided"] for i in range(len(steps))))
    latents_tolerance = spread_tolerance(max([spread[f"steps.{i}.latents"] for i in range(len(steps))] + [spread["final"]]))
    for i, (noise, x) in enumerate(zip(guided, steps)):
        assert max_abs_error(noise, tensors[f"steps.{i}.noise_pred_guided"], f"{variant}/{run} eps {i}") <= eps_tolerance
        assert max_abs_error(x, tensors[f"steps.{i}.latents"], f"{variant}/{run} latents {i}") <= latents_tolerance
    final = torch.cat([tensors["cond.condition_latents"], latents], dim=2)
    assert max_abs_error(final, tensors["final.latents"], f"{variant}/{run} final") <= latents_tolerance

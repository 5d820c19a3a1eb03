"""Euler and DDIM against diffusers (committed fixtures) and against the original MuseV run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error
from musev_lite.samplers import DDIMSampler, EulerSampler, SchedulerConfig, make_sampler

CASES = json.loads((FIXTURES / "samplers/cases.json").read_text())
STEPS = load_file(FIXTURES / "samplers/steps.safetensors")


def run(case):
    sampler = make_sampler(case["sampler"], SchedulerConfig.from_dict(case["config"]), case["steps"], case["eta"])
    generator = torch.Generator().manual_seed(case["step_generator_seed"])
    x = STEPS["x_T"] * sampler.init_noise_sigma
    latents, scaled = [], []
    for i in range(len(sampler.timesteps)):
        scaled.append(sampler.scale_model_input(x, i))
        x = sampler.step(STEPS["model_outputs"][i], i, x, generator=generator)
        latents.append(x)
    return sampler, torch.stack(latents), torch.stack(scaled)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['key']}-{c['sampler']}-{c['steps']}")
def test_matches_diffusers(case):
    """Tolerance: 1e-6 relative to the latents' magnitude (they reach ~15 at sigma_max)."""
    sampler, latents, scaled = run(case)
    key = case["key"]
    assert torch.equal(sampler.timesteps.double(), STEPS[f"{key}.timesteps"].double())
    assert sampler.init_noise_sigma == pytest.approx(case["init_noise_sigma"], rel=1e-7)
    if f"{key}.sigmas" in STEPS:
        assert max_abs_error(sampler.sigmas, STEPS[f"{key}.sigmas"], f"{key} sigmas") <= 1e-6
    scale = max(1.0, STEPS[f"{key}.latents"].abs().max().item())
    assert max_abs_error(scaled, STEPS[f"{key}.scaled_inputs"], f"{key} model inputs") <= 1e-6 * scale
    assert max_abs_error(latents, STEPS[f"{key}.latents"], f"{key} latents") <= 1e-6 * scale


def test_grid_covers_what_musev_uses():
    euler = [c for c in CASES if c["sampler"] == "euler"]
    assert {c["config"].get("timestep_spacing") for c in euler} == {"linspace", "leading", "trailing", None}
    assert {c["eta"] for c in CASES if c["sampler"] == "ddim"} == {0.0, 0.7}
    assert {c["config"]["prediction_type"] for c in CASES if "prediction_type" in c["config"]} == {
        "epsilon", "v_prediction"}


@pytest.mark.parametrize("variant", ["musev", "musev_referencenet"])
@pytest.mark.parametrize("run_name", ["t20_linspace", "t20_leading", "t13_linspace3"])
def test_euler_equals_the_original_run(shared, variant, run_name):
    fixtures = shared / "reference/fixtures"
    meta = json.loads((fixtures / "manifest.json").read_text())["variants"][variant]["runs"][run_name]
    tensors = load_file(fixtures / variant / f"{run_name}.safetensors")
    num_steps = len(meta["step_timesteps"])
    sampler = EulerSampler(SchedulerConfig.from_dict(meta["checkpoint_scheduler_config"]), num_steps)
    assert sampler.timesteps.tolist() == meta["step_timesteps"]
    assert torch.equal(sampler.timesteps, tensors["scheduler.timesteps"].float())
    assert torch.equal(sampler.sigmas, tensors["scheduler.sigmas"].float())
    assert sampler.init_noise_sigma == pytest.approx(meta["init_noise_sigma"], rel=1e-7)
    x = tensors["latents.x_T"]
    for i in range(num_steps):
        x = sampler.step(tensors[f"steps.{i}.noise_pred_guided"], i, x)
        assert max_abs_error(x, tensors[f"steps.{i}.latents"], f"{variant}/{run_name} step {i}") <= 1e-4


def test_config_from_json_ignores_foreign_keys(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "steps_offset": 1,
                                "beta_schedule": "scaled_linear", "timestep_spacing": "leading"}))
    config = SchedulerConfig.from_json(path)
    assert config.timestep_spacing == "leading" and config.steps_offset == 1
    assert EulerSampler(config, 4).timesteps.tolist() == [751.0, 501.0, 251.0, 1.0]
    assert DDIMSampler(config, 4).timesteps.tolist() == [751, 501, 251, 1]


def test_add_noise():
    config = SchedulerConfig()
    x0, noise = torch.ones(2), torch.full((2,), 2.0)
    euler = EulerSampler(config, 10)
    assert torch.allclose(euler.add_noise(x0, noise, 0), x0 + 2.0 * euler.sigmas[0])
    ddim = DDIMSampler(config, 10)
    a = config.alphas_cumprod()[int(ddim.timesteps[0])]
    assert torch.allclose(ddim.add_noise(x0, noise, 0), a.sqrt() + 2.0 * (1 - a).sqrt())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SchedulerConfig(beta_schedule="cosine"), "beta_schedule='cosine' is not supported"),
        (lambda: SchedulerConfig(timestep_spacing="even"), "timestep_spacing='even'"),
        (lambda: SchedulerConfig(prediction_type="sample"), "prediction_type='sample'"),
        (lambda: make_sampler("euler", SchedulerConfig(), 0), r"steps must be an integer in 1\.\.1000"),
        (lambda: make_sampler("euler", SchedulerConfig(), 1001), "got 1001"),
        (lambda: make_sampler("dpm", SchedulerConfig(), 10), "sampler 'dpm' is unknown"),
        (lambda: make_sampler("ddim", SchedulerConfig(), 10, eta=-1), "eta must be >= 0"),
    ],
)
def test_bad_settings_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()

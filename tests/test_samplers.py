"""Euler and DDIM against diffusers (committed fixtures) and against the original MuseV run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error, rounding_tolerance
from musev_lite.samplers import SchedulerConfig, make_sampler

# Tolerances (conftest.rounding_tolerance, fp32): the schedule (sigma from alphas_cumprod, the timestep
# interpolation) takes ~5 roundings that another CPU's pow/sqrt may do differently (the cumulative product is
# the same sequential loop everywhere); each Euler or DDIM step ~10 more.
SCHEDULE_ROUNDINGS, STEP_ROUNDINGS = 5, 10
CASES = json.loads((FIXTURES / "samplers/cases.json").read_text())
STEPS = load_file(FIXTURES / "samplers/steps.safetensors")
SD15 = next(c["config"] for c in CASES if c["config"].get("_class_name") == "PNDMScheduler")


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


def case_id(case):
    config = case["config"]
    return "-".join(str(v) for v in (case["key"], case["sampler"], config.get("timestep_spacing", "default"),
                                      config.get("prediction_type", "eps"), case["steps"], case["eta"]))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_diffusers(case):
    """Timesteps exact; sigmas, model inputs, latents after every step and add_noise to the rounding of
    the schedule and the steps (they reach ~15 at sigma_max)."""
    sampler, latents, scaled = run(case)
    key = case["key"]
    assert sampler.timesteps.dtype == STEPS[f"{key}.timesteps"].dtype
    assert torch.equal(sampler.timesteps, STEPS[f"{key}.timesteps"])
    # 2 float32 ulps: torch's float32 pow rounds differently on different CPUs (diffusers itself gives
    # 6.6463127 on one machine and 6.6463118 on another for case85)
    assert sampler.init_noise_sigma == pytest.approx(case["init_noise_sigma"], rel=2.5e-7)
    steps_depth = SCHEDULE_ROUNDINGS + STEP_ROUNDINGS * case["steps"]  # after every step, at most
    for name, ours, depth in (("sigmas", getattr(sampler, "sigmas", None), SCHEDULE_ROUNDINGS),
                              ("scaled_inputs", scaled, steps_depth), ("latents", latents, steps_depth)):
        if f"{key}.{name}" in STEPS:  # DDIM has no sigmas
            reference = STEPS[f"{key}.{name}"]
            assert max_abs_error(ours, reference, f"{key} {name}") <= rounding_tolerance(reference, depth)
    if f"{key}.noised" in STEPS:
        noised = torch.stack([sampler.add_noise(STEPS["clean"], STEPS["x_T"], i) for i in range(case["steps"])])
        reference = STEPS[f"{key}.noised"]
        assert max_abs_error(noised, reference, f"{key} add_noise") <= rounding_tolerance(reference, SCHEDULE_ROUNDINGS + 5)


def test_grid_covers_the_brief():
    euler = [c for c in CASES if c["sampler"] == "euler"]
    ddim = [c for c in CASES if c["sampler"] == "ddim"]
    for group in (euler, ddim):
        assert {c["config"].get("timestep_spacing") for c in group} == {"linspace", "leading", "trailing", None}
        assert {c["config"].get("prediction_type") for c in group} >= {"epsilon", "v_prediction"}
        assert {c["config"].get("steps_offset") for c in group} >= {0, 1}
        assert {c["steps"] for c in group} == {3, 7, 10, 25}
    assert {c["config"].get("set_alpha_to_one") for c in ddim} >= {True, False}
    assert {c["config"].get("clip_sample") for c in ddim} == {True, False, None}
    assert {c["eta"] for c in ddim} == {0.0, 0.7}


def test_missing_spacing_means_linspace_for_euler_and_leading_for_ddim():
    """The quirk MuseV relies on (fixtures README "Scheduler spacing"), checked against diffusers."""
    config = SchedulerConfig.from_dict(SD15)
    assert config.timestep_spacing is None
    euler, ddim = make_sampler("euler", config, 10), make_sampler("ddim", config, 10)
    reference = {c["sampler"]: STEPS[f"{c['key']}.timesteps"] for c in CASES if c["config"] == SD15}
    assert torch.equal(euler.timesteps, reference["euler"]) and euler.timesteps[1].item() == 888.0
    assert torch.equal(ddim.timesteps, reference["ddim"]) and ddim.timesteps[0].item() == 901


def test_trailing_keeps_num_steps_where_diffusers_adds_one():
    """Deviation on purpose: diffusers' trailing `arange` gives 62 timesteps for 61 steps (the last one -1)."""
    reference = STEPS["trailing61.timesteps"]
    assert len(reference) == 62 and reference[-1].item() == -1.0
    ours = make_sampler("euler", SchedulerConfig(timestep_spacing="trailing"), 61).timesteps
    assert torch.equal(ours, reference[:61])


@pytest.mark.parametrize("variant", ["musev", "musev_referencenet"])
@pytest.mark.parametrize("run_name", ["t20_linspace", "t20_leading", "t13_linspace3"])
def test_euler_equals_the_original_run(shared, variant, run_name):
    """Euler from the checkpoint's scheduler_config.json, stepped with the original's guided eps:
    latents after every step equal to the original run's, to the rounding of the schedule and the steps."""
    fixtures = shared / "reference/fixtures"
    meta = json.loads((fixtures / "manifest.json").read_text())["variants"][variant]["runs"][run_name]
    tensors = load_file(fixtures / variant / f"{run_name}.safetensors")
    num_steps = len(meta["step_timesteps"])
    sampler = make_sampler("euler", SchedulerConfig.from_dict(meta["checkpoint_scheduler_config"]), num_steps)
    assert sampler.timesteps.tolist() == meta["step_timesteps"]
    assert torch.equal(sampler.timesteps, tensors["scheduler.timesteps"].float())
    sigmas = tensors["scheduler.sigmas"].float()
    assert max_abs_error(sampler.sigmas, sigmas, f"{run_name} sigmas") <= rounding_tolerance(sigmas, SCHEDULE_ROUNDINGS)
    assert sampler.init_noise_sigma == pytest.approx(meta["init_noise_sigma"], rel=1e-7)
    x = tensors["latents.x_T"]
    for i in range(num_steps):
        x = sampler.step(tensors[f"steps.{i}.noise_pred_guided"], i, x)
        reference = tensors[f"steps.{i}.latents"]
        tolerance = rounding_tolerance(reference, SCHEDULE_ROUNDINGS + STEP_ROUNDINGS * (i + 1))
        assert max_abs_error(x, reference, f"{variant}/{run_name} step {i}") <= tolerance


def test_config_from_json_ignores_foreign_keys(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(dict(SD15, timestep_spacing="leading")))
    config = SchedulerConfig.from_json(path)
    assert (config.timestep_spacing, config.steps_offset, config.set_alpha_to_one) == ("leading", 1, False)
    assert make_sampler("euler", config, 4).timesteps.tolist() == [751.0, 501.0, 251.0, 1.0]
    assert make_sampler("ddim", config, 4).timesteps.tolist() == [751, 501, 251, 1]


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", r"scheduler_config\.json: cannot read scheduler config"),
        ("[1, 2]", r"scheduler_config\.json: .*expected a JSON object"),
        ('{"beta_schedule": "squaredcos_cap_v2"}', r"scheduler_config\.json: .*beta_schedule='squaredcos_cap_v2'"),
        ('{"use_karras_sigmas": true}', "use_karras_sigmas=True is not supported.*set it to false"),
        ('{"rescale_betas_zero_snr": true}', "rescale_betas_zero_snr=True is not supported"),
        ('{"trained_betas": [0.1, 0.2]}', "trained_betas=.*set it to null"),
        ('{"num_train_timesteps": "1000"}', "num_train_timesteps='1000' must be an integer >= 1"),
    ],
)
def test_bad_json_is_named(tmp_path, text, message):
    path = tmp_path / "scheduler_config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        SchedulerConfig.from_json(path)


def test_missing_json_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.json: cannot read"):
        SchedulerConfig.from_json(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SchedulerConfig(beta_schedule="cosine"),
         r"beta_schedule='cosine' is not supported; use one of \('linear', 'scaled_linear'\)"),
        (lambda: SchedulerConfig(timestep_spacing="even"),
         r"timestep_spacing='even' .*'linspace', 'leading', 'trailing'"),
        (lambda: SchedulerConfig(prediction_type="sample"), r"prediction_type='sample' .*'epsilon', 'v_prediction'"),
        (lambda: SchedulerConfig(beta_end=2.0), r"beta_end=2\.0 must be a number in \(0, 1\)"),
        (lambda: SchedulerConfig(steps_offset=-1), "steps_offset=-1 must be an integer >= 0"),
        (lambda: make_sampler("euler", SchedulerConfig(), 0), r"num_steps must be an integer in 1\.\.1000"),
        (lambda: make_sampler("ddim", SchedulerConfig(), 1001), r"num_steps .*got 1001"),
        (lambda: make_sampler("euler", SchedulerConfig(), 2.5), r"num_steps .*got 2\.5"),
        (lambda: make_sampler("ddim", SchedulerConfig(steps_offset=1), 1000), "timestep 1000, past the last"),
        (lambda: make_sampler("dpm", SchedulerConfig(), 10),
         r"sampler 'dpm' is unknown; use one of \('euler', 'ddim'\)"),
        (lambda: make_sampler("ddim", SchedulerConfig(), 10, eta=-1), "eta must be a number >= 0"),
        (lambda: make_sampler("euler", SchedulerConfig(), 10, eta=0.5), "eta=0.5 only applies to the 'ddim'"),
    ],
)
def test_bad_settings_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()

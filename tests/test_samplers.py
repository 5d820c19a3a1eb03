"""Euler, DDIM and LCM against diffusers (committed fixtures; LCM's video noise also against MuseV's own
LCMScheduler), Euler against the original MuseV run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error, rounding_tolerance
from musev_lite.samplers import LCMSampler, SchedulerConfig, make_sampler, video_fusion_noise

# Tolerances (conftest.rounding_tolerance, fp32): the schedule (sigma from alphas_cumprod, the timestep
# interpolation) takes ~5 roundings that another CPU's pow/sqrt may do differently (the cumulative product is
# the same sequential loop everywhere); each Euler or DDIM step ~10 more.
SCHEDULE_ROUNDINGS, STEP_ROUNDINGS = 5, 10
CASES = json.loads((FIXTURES / "samplers/cases.json").read_text())
STEPS = load_file(FIXTURES / "samplers/steps.safetensors")
SD15 = next(c["config"] for c in CASES if c["config"].get("_class_name") == "PNDMScheduler")
LCM_CASES = json.loads((FIXTURES / "samplers/lcm_cases.json").read_text())
LCM_STEPS = load_file(FIXTURES / "samplers/lcm_steps.safetensors")


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
         r"sampler 'dpm' is unknown; use one of \('euler', 'ddim', 'lcm'\)"),
        (lambda: make_sampler("ddim", SchedulerConfig(), 10, eta=-1), "eta must be a number >= 0"),
        (lambda: make_sampler("euler", SchedulerConfig(), 10, eta=0.5), "eta=0.5 only applies to the 'ddim'"),
        (lambda: make_sampler("lcm", SchedulerConfig(), 10, eta=0.3), "eta=0.3 only applies to the 'ddim' .*'lcm'"),
        (lambda: make_sampler("lcm", SchedulerConfig(), 51),
         r"the 'lcm' sampler takes 1\.\.50 steps \(its original_inference_steps; 4-8 .*got 51"),
        (lambda: make_sampler("lcm", SchedulerConfig(original_inference_steps=8), 10), r"takes 1\.\.8 steps"),
        (lambda: make_sampler("lcm", SchedulerConfig(), 0), r"takes 1\.\.50 steps .*got 0"),
        (lambda: make_sampler("lcm", SchedulerConfig(original_inference_steps=2000), 4),
         "original_inference_steps=2000 is more than num_train_timesteps=1000"),
        (lambda: make_sampler("lcm", SchedulerConfig(), 4, noise_type="pink"), "noise_type 'pink' is unknown"),
        (lambda: SchedulerConfig(original_inference_steps=0), "original_inference_steps=0 must be an integer >= 1"),
        (lambda: SchedulerConfig(timestep_scaling=float("inf")), "timestep_scaling=inf must be a finite number > 0"),
        (lambda: SchedulerConfig(clip_sample="yes"), "clip_sample='yes' must be true or false"),
    ],
)
def test_bad_settings_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# LCM (fixture: tests/make_fixtures.py lcm with diffusers 0.42.1; its video_fusion cases from MuseV's own
# LCMScheduler @43370a6). A step (x0_hat, the boundary-condition mix, the noising) takes ~10 roundings, as
# Euler's and DDIM's do; the schedule (alphas_cumprod, c_skip / c_out) ~5.


def lcm_run(case):
    sampler = make_sampler("lcm", SchedulerConfig.from_dict(case["config"]), case["steps"],
                           noise_type=case["noise_type"], w_ind_noise=case["w_ind_noise"])
    generator = torch.Generator().manual_seed(case["step_generator_seed"])
    x, latents, denoised = LCM_STEPS["x_T"] * sampler.init_noise_sigma, [], []
    for i in range(len(sampler.timesteps)):
        assert torch.equal(sampler.scale_model_input(x, i), x)
        denoised.append(sampler.denoised(LCM_STEPS["model_outputs"][i], i, x))
        x = sampler.step(LCM_STEPS["model_outputs"][i], i, x, generator=generator)
        latents.append(x)
    return sampler, torch.stack(latents), torch.stack(denoised), generator


def lcm_case_id(case):
    return "-".join(str(v) for v in (case["key"], case["source"], case["config"].get("prediction_type", "eps"),
                                      case["steps"], case["noise_type"], case["w_ind_noise"]))


@pytest.mark.parametrize("case", LCM_CASES, ids=lcm_case_id)
def test_lcm_matches_diffusers(case):
    """Timesteps exact (picked from original_inference_steps); `denoised` and the latents after every step to
    the rounding of the schedule and the steps; the step noise drawn as the reference draws it (the generator
    ends in the same state: no draw at the last step); add_noise to the rounding of the schedule."""
    sampler, latents, denoised, generator = lcm_run(case)
    key = case["key"]
    assert sampler.timesteps.dtype == torch.int64 and torch.equal(sampler.timesteps, LCM_STEPS[f"{key}.timesteps"])
    assert sampler.init_noise_sigma == case["init_noise_sigma"]
    depth = SCHEDULE_ROUNDINGS + STEP_ROUNDINGS * case["steps"]
    for name, ours in (("denoised", denoised), ("latents", latents)):
        reference = LCM_STEPS[f"{key}.{name}"]
        assert max_abs_error(ours, reference, f"{key} {name}") <= rounding_tolerance(reference, depth)
    assert torch.equal(torch.randn(4, generator=generator), LCM_STEPS[f"{key}.next_draw"])
    if f"{key}.noised" in LCM_STEPS:
        noised = torch.stack([sampler.add_noise(LCM_STEPS["clean"], LCM_STEPS["x_T"], i) for i in range(case["steps"])])
        reference = LCM_STEPS[f"{key}.noised"]
        assert max_abs_error(noised, reference, f"{key} add_noise") <= rounding_tolerance(reference, SCHEDULE_ROUNDINGS + 5)


def test_lcm_grid_covers_the_brief():
    """1-8 and 50 steps on SD1.5's config as MuseV builds it, MuseV's video noise, the other settings LCM reads."""
    sd15 = [c for c in LCM_CASES if c["config"] == SD15]
    assert {c["steps"] for c in sd15 if c["source"] == "diffusers"} >= set(range(1, 9)) | {50}
    assert {(c["noise_type"], c["w_ind_noise"]) for c in sd15 if c["source"] == "musev"} >= {
        ("video_fusion", 0.5), ("video_fusion", 0.3), ("random", 0.5)}
    other = [c["config"] for c in LCM_CASES if c["config"] not in (SD15, {})]
    assert any(c.get("prediction_type") == "v_prediction" and c.get("clip_sample") and c.get("timestep_scaling") != 10
               and c.get("original_inference_steps") != 50 for c in other)
    assert {} in [c["config"] for c in LCM_CASES]


def test_lcm_video_noise_is_video_fusion_noise_of_the_model_output():
    """What a video step adds: sqrt(1 - a_prev) times VideoFusion noise of the model output's shape, drawn from
    the step's generator with the sampler's w_ind_noise (MuseV's LCMScheduler with noise_type="video_fusion")."""
    sampler = make_sampler("lcm", SchedulerConfig.from_dict(SD15), 4, noise_type="video_fusion", w_ind_noise=0.3)
    x, eps = LCM_STEPS["x_T"], LCM_STEPS["model_outputs"][0]
    stepped = sampler.step(eps, 0, x, torch.Generator().manual_seed(3))
    a_prev = sampler.alphas_cumprod[int(sampler.timesteps[1])]
    noise = video_fusion_noise(x.shape, torch.Generator().manual_seed(3), 0.3)
    assert torch.allclose(stepped, a_prev.sqrt() * sampler.denoised(eps, 0, x) + (1 - a_prev).sqrt() * noise)
    assert torch.equal(sampler.step(eps, 3, x, None), sampler.denoised(eps, 3, x))  # the last step draws nothing


def test_lcm_clip_sample_missing_from_the_file_means_no_clipping():
    """DDIM clips x0 when the file has no clip_sample (diffusers' DDIM default), LCM does not (LCM's default)."""
    config = SchedulerConfig.from_dict({})
    assert config.clip_sample is None
    x = torch.full((1, 4, 1, 1, 1), 3.0)
    assert LCMSampler(config, 2).denoised(torch.zeros_like(x), 1, x).min() > 2

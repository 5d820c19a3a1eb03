"""Regenerate the small committed parity fixtures in tests/fixtures/ from the reference libraries.

Run by hand in a venv with the `reference` extra (diffusers, transformers); CI never runs this:

    python tests/make_fixtures.py            # every part
    python tests/make_fixtures.py samplers   # one part

Each part builds tiny, seeded reference objects, saves their weights in the published layout, their
inputs and their outputs. The tests load the weights through musev_lite and compare.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "fixtures"


def save(part: str, name: str, tensors: dict) -> None:
    (OUT / part).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, OUT / part / f"{name}.safetensors")


def make_samplers():
    """Timesteps, sigmas and whole step sequences of diffusers' Euler and DDIM over a grid of configs."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    # runwayml SD1.5 scheduler/scheduler_config.json as published: PNDM, no timestep_spacing key
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None}
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn((1, 4, 2, 3), generator=generator)  # unit noise; times init_noise_sigma = start
    outputs = torch.randn((25, 1, 4, 2, 3), generator=generator)  # a fixed fake model output per step
    clean = torch.randn((1, 4, 2, 3), generator=generator)  # an x0 for add_noise
    cases, tensors = [], {"x_T": x_T, "model_outputs": outputs, "clean": clean}

    def record(name, config, steps, eta=0.0):
        scheduler = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[name].from_config(config)
        scheduler.set_timesteps(steps)
        x = x_T * scheduler.init_noise_sigma
        latents, scaled = [], []
        step_generator = torch.Generator().manual_seed(7)
        for i, t in enumerate(scheduler.timesteps):
            scaled.append(scheduler.scale_model_input(x, t))
            kwargs = {"eta": eta, "generator": step_generator} if name == "ddim" else {}
            x = scheduler.step(outputs[i], t, x, **kwargs).prev_sample
            latents.append(x)
        key = f"case{len(cases)}"
        tensors[f"{key}.timesteps"] = scheduler.timesteps.clone()
        tensors[f"{key}.latents"] = torch.stack(latents)
        if name == "euler" or "timestep_spacing" not in config:  # DDIM's is the identity: a few suffice
            tensors[f"{key}.scaled_inputs"] = torch.stack(scaled)
        if name == "euler":
            tensors[f"{key}.sigmas"] = scheduler.sigmas.clone()
        if steps == 10 and eta == 0 and not config.get("set_alpha_to_one"):  # add_noise ignores those
            noised = [scheduler.add_noise(clean, x_T, scheduler.timesteps[i : i + 1]) for i in range(steps)]
            tensors[f"{key}.noised"] = torch.stack(noised)
        cases.append(dict(key=key, sampler=name, config=config, steps=steps, eta=eta,
                          init_noise_sigma=float(scheduler.init_noise_sigma), step_generator_seed=7))

    for steps in (3, 7, 10, 25):
        for spacing in ("linspace", "leading", "trailing"):
            for prediction in ("epsilon", "v_prediction"):
                for offset in (0, 1):
                    config = dict(base, timestep_spacing=spacing, prediction_type=prediction, steps_offset=offset)
                    record("euler", config, steps)
                    for alpha_one in (False, True):
                        for eta in (0.0, 0.7):
                            record("ddim", dict(config, set_alpha_to_one=alpha_one, clip_sample=False), steps, eta)
    # SD1.5's file lacks timestep_spacing: Euler built from it (as MuseV does) uses linspace, DDIM leading
    record("euler", sd15, 10)
    record("ddim", sd15, 10)
    # an empty config = diffusers' defaults (linear betas; DDIM clips x0 to [-1, 1], alpha_prev 1 at the end)
    record("euler", {}, 10)
    record("ddim", {}, 10)
    record("ddim", {}, 7, eta=0.7)
    record("ddim", dict(base, timestep_spacing="trailing", clip_sample=True, clip_sample_range=1.5), 7)
    # trailing with 61 of 1000 steps: diffusers' arange yields 62 timesteps (the last -1)
    euler = EulerDiscreteScheduler(**base, timestep_spacing="trailing")
    euler.set_timesteps(61)
    tensors["trailing61.timesteps"] = euler.timesteps.clone()

    save("samplers", "steps", tensors)
    lines = ",\n".join(json.dumps(case) for case in cases)
    (OUT / "samplers" / "cases.json").write_text(f"[\n{lines}\n]\n")


PARTS = {
    "samplers": make_samplers,
}

if __name__ == "__main__":
    torch.manual_seed(0)
    wanted = sys.argv[1:] or list(PARTS)
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    for part in wanted:
        print(f"making {part} ...", flush=True)
        PARTS[part]()

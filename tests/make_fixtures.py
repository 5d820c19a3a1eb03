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
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn((1, 4, 2, 3), generator=generator)
    outputs = torch.randn((25, 1, 4, 2, 3), generator=generator)  # a fixed fake model output per step
    cases, tensors = [], {"x_T": x_T, "model_outputs": outputs}

    def record(name, scheduler, config, steps, eta=None):
        scheduler.set_timesteps(steps)
        x = x_T * scheduler.init_noise_sigma
        latents, scaled = [], []
        step_generator = torch.Generator().manual_seed(7)
        for i, t in enumerate(scheduler.timesteps):
            scaled.append(scheduler.scale_model_input(x, t))
            kwargs = {"eta": eta, "generator": step_generator} if eta is not None else {}
            x = scheduler.step(outputs[i], t, x, **kwargs).prev_sample
            latents.append(x)
        key = f"case{len(cases)}"
        tensors[f"{key}.timesteps"] = scheduler.timesteps.clone()
        tensors[f"{key}.latents"] = torch.stack(latents)
        tensors[f"{key}.scaled_inputs"] = torch.stack(scaled)
        if hasattr(scheduler, "sigmas"):
            tensors[f"{key}.sigmas"] = scheduler.sigmas.clone()
        cases.append(dict(key=key, sampler=name, config=config, steps=steps, eta=eta or 0.0,
                          init_noise_sigma=float(scheduler.init_noise_sigma), step_generator_seed=7))

    for steps in (3, 7, 10, 25):
        for spacing in ("linspace", "leading", "trailing"):
            for prediction in ("epsilon", "v_prediction"):
                for offset in (0, 1):
                    config = dict(base, timestep_spacing=spacing, prediction_type=prediction, steps_offset=offset)
                    record("euler", EulerDiscreteScheduler(**config), config, steps)
                    for alpha_one in (False, True):
                        for eta in (0.0, 0.7):
                            ddim = dict(config, set_alpha_to_one=alpha_one, clip_sample=False)
                            record("ddim", DDIMScheduler(**ddim), ddim, steps, eta)
    # SD1.5's PNDM scheduler_config.json has no timestep_spacing: Euler built from it keeps linspace
    pndm = PNDMScheduler(**base, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
    pndm_config = {k: v for k, v in dict(pndm.config).items() if k != "timestep_spacing" and not k.startswith("_")}
    record("euler", EulerDiscreteScheduler.from_config(pndm_config), dict(pndm_config, _class_name="PNDMScheduler"), 10)

    save("samplers", "steps", tensors)
    (OUT / "samplers" / "cases.json").write_text(json.dumps(cases, indent=1, default=str) + "\n")


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

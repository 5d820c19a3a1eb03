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


def make_unet2d():
    """A tiny random diffusers UNet2DConditionModel with SD1.5's structure (4 levels, 2 layers,
    cross-attention in the first 3, widths changing so every conv_shortcut exists), its output for a
    12x20 latent (not a multiple of 8: the up path meets odd sizes) at fractional and integer
    timesteps. Weights are random (not diffusers' init, so every tensor matters) and rounded to fp16
    before the run, stored fp16: exact when read back as fp32. Keeps the fixture under 1 MB."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16, 24, 24), layers_per_block=2, attention_head_dim=2,
        norm_num_groups=4, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)  # N(0, 1/fan_in)
            p.copy_(p.half().float())
    sample = torch.randn((2, 4, 12, 20), generator=generator)
    timestep = torch.tensor([499.5, 21.0])
    text = torch.randn((2, 7, 16), generator=generator)
    with torch.no_grad():
        out = unet(sample, timestep, encoder_hidden_states=text).sample
    save("unet2d", "weights", {k: v.half() for k, v in unet.state_dict().items()})
    save("unet2d", "io", {"sample": sample, "timestep": timestep, "text": text, "out": out})
    (OUT / "unet2d" / "config.json").write_text(json.dumps(dict(unet.config), indent=1, default=list) + "\n")


PARTS = {
    "samplers": make_samplers,
    "unet2d": make_unet2d,
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

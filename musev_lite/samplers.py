"""Samplers: Euler (MuseV's default) and DDIM, as plain arithmetic over the noise schedule.

    betas            -> alphas_cumprod[t] = prod(1 - beta)       (the training noise schedule)
    sigma(t)         =  sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])
    Euler step       x <- x + (x - x0_hat) / sigma_i * (sigma_{i+1} - sigma_i)
    DDIM step        x <- sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s^2) eps_hat + s z

Both match diffusers' EulerDiscreteScheduler / DDIMScheduler step for step (same float32 schedule
arithmetic), read their settings from a checkpoint's `scheduler_config.json`, and share one small
interface used by the denoising loop: `timesteps`, `init_noise_sigma`, `scale_model_input(x, i)`,
`step(model_output, i, x, generator)`, `add_noise(x0, noise, i)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")
SAMPLERS = ("euler", "ddim")


@dataclass
class SchedulerConfig:
    """The training noise schedule, with SD1.5's values as defaults.

    `timestep_spacing=None` means "not in the checkpoint's file": each sampler then uses its own
    default, as diffusers' `from_config` does (Euler: linspace, DDIM: leading). MuseV builds Euler
    from SD1.5's PNDM config, which lacks the key, so its runs use linspace spacing (fixtures README).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False

    def __post_init__(self):
        for key, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", SPACINGS + (None,)),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"scheduler config: {key}={getattr(self, key)!r} is not supported; use one of {allowed}")

    @classmethod
    def from_dict(cls, config: dict) -> SchedulerConfig:
        """Keep the keys we use; others (`_class_name`, `skip_prk_steps`, ...) do not change the math."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config: trained_betas is not supported; use beta_start/beta_end/beta_schedule")
        return cls(**{k: v for k, v in config.items() if k in fields})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SchedulerConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read scheduler config ({err})") from None

    def alphas_cumprod(self) -> torch.Tensor:
        """Cumulative product of (1 - beta_t), float32 as diffusers computes it."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        else:  # scaled_linear: linear in sqrt(beta)
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        return torch.cumprod(1.0 - betas, dim=0)


def _check_steps(config: SchedulerConfig, num_steps: int) -> None:
    if not isinstance(num_steps, int) or not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(f"steps must be an integer in 1..{config.num_train_timesteps}, got {num_steps!r}")


def spaced_timesteps(config: SchedulerConfig, num_steps: int, spacing: str) -> np.ndarray:
    """The `num_steps` training timesteps to visit, high noise first (float64; may be fractional)."""
    n = config.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, n - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(num_steps) * (n // num_steps)).round()[::-1] + config.steps_offset
    return np.round(np.arange(n, 0, -n / num_steps)) - 1  # trailing


class EulerSampler:
    """Deterministic Euler over sigmas (diffusers' EulerDiscreteScheduler with s_churn = 0).

    MuseV's own Euler subclass also draws a noise tensor every step and never uses it (gamma = 0,
    pipeline.md §4.1); that only advances the random generator and is left out here.
    """

    def __init__(self, config: SchedulerConfig, num_steps: int):
        _check_steps(config, num_steps)
        self.config = config
        spacing = config.timestep_spacing or "linspace"
        timesteps = spaced_timesteps(config, num_steps, spacing).astype(np.float32)
        train_sigmas = (((1 - config.alphas_cumprod()) / config.alphas_cumprod()) ** 0.5).numpy()
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)  # fractional t: linear
        self.timesteps = torch.from_numpy(timesteps)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        sigma_max = self.sigmas.max()
        self.init_noise_sigma = float(sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        if self.config.prediction_type == "epsilon":
            x0 = x - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        derivative = (x - x0) / sigma
        return (x + derivative * (sigma_next - sigma)).to(model_output.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return x0 + noise * self.sigmas[i].to(x0.dtype)


class DDIMSampler:
    """DDIM (diffusers' DDIMScheduler): deterministic at eta = 0, adds fresh noise for eta > 0."""

    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig, num_steps: int, eta: float = 0.0):
        _check_steps(config, num_steps)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.config, self.eta = config, eta
        spacing = config.timestep_spacing or "leading"
        timesteps = spaced_timesteps(config, num_steps, spacing)
        self.timesteps = torch.from_numpy(timesteps.round().astype(np.int64))
        self.alphas_cumprod = config.alphas_cumprod()
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        # diffusers steps back by a fixed stride whatever the spacing; kept for equal results
        self.stride = config.num_train_timesteps // num_steps

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        t = int(self.timesteps[i])
        prev = t - self.stride
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        if self.config.prediction_type == "epsilon":
            x0 = (x - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        else:  # v_prediction
            x0 = a_t**0.5 * x - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * x
        if self.config.clip_sample:
            x0 = x0.clamp(-1, 1)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = self.eta * variance**0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype, device=model_output.device)
            x_prev = x_prev + std * noise
        return x_prev

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        a = self.alphas_cumprod[int(self.timesteps[i])].to(x0.dtype)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def make_sampler(name: str, config: SchedulerConfig, num_steps: int, eta: float = 0.0):
    """"euler" (MuseV's default) or "ddim"."""
    if name == "euler":
        return EulerSampler(config, num_steps)
    if name == "ddim":
        return DDIMSampler(config, num_steps, eta)
    raise ValueError(f"sampler {name!r} is unknown; use one of {SAMPLERS}")

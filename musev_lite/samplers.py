"""Samplers: Euler (MuseV's default), DDIM and LCM, as plain arithmetic over the noise schedule, and the
VideoFusion noise MuseV starts a video from (and its Euler and LCM draw at every step).

    betas            -> alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)     (the training noise schedule)
    sigma(t)         =  sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])
    Euler step       x <- x + (x - x0_hat) / sigma_i * (sigma_{i+1} - sigma_i)
    DDIM step        x <- sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s^2) eps_hat + s z
    LCM step         d = c_out(t) x0_hat + c_skip(t) x;   x <- sqrt(a_prev) d + sqrt(1 - a_prev) z  (last step: d)

All three match diffusers' EulerDiscreteScheduler / DDIMScheduler / LCMScheduler step for step (same
float32 schedule arithmetic), read their settings from a checkpoint's `scheduler_config.json` the way
diffusers' `from_config` does, and share one small interface used by the denoising loop: `timesteps`,
`init_noise_sigma`, `scale_model_input(x, i)`, `step(model_output, i, x, generator)`,
`add_noise(x0, noise, i)`, where `i` is the index of the step (0 = noisiest).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch

from .settings import SAMPLERS
from .limits import parse_nested
from .weights import config_from_dict

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")
# diffusers' betas (beta_start, beta_end, beta_schedule) for a config without them: Euler's and DDIM's, LCM's
EULER_BETAS = (0.0001, 0.02, "linear")
LCM_BETAS = (0.00085, 0.012, "scaled_linear")
NOISE_TYPES = ("random", "video_fusion")  # MuseV's names for plain and VideoFusion noise

# SD1.5's scheduler/scheduler_config.json (PNDM; no timestep_spacing key, so Euler spaces linearly, as
# in MuseV): the schedule of a base model that ships none (a single-file checkpoint, the demo)
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
# Settings of diffusers' schedulers that this module does not implement, with the value that turns
# them off. A config that turns one on is refused instead of being sampled differently in silence.
UNSUPPORTED = {
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "final_sigmas_type": "zero",
}


@dataclass
class SchedulerConfig:
    """The training noise schedule and how to walk it. Defaults are diffusers' (Euler's = DDIM's), so a
    `scheduler_config.json` that lacks a key means the same here as in diffusers' `from_config`.

    `timestep_spacing=None` means "not in the file": each sampler then uses its own default, as
    diffusers does (Euler: linspace, DDIM: leading). MuseV builds its Euler from SD1.5's PNDM config,
    which lacks the key, so its runs use linspace spacing (docs/method.md#the-sampler).
    `clip_sample=None` and the betas at None likewise: DDIM clips x0 (its default), LCM does not; Euler and
    DDIM take linear betas 0.0001..0.02, LCM SD1.5's scaled_linear 0.00085..0.012 (its defaults: MuseV's
    `LCMScheduler.from_config(euler.config)` passes on only the keys the file had).
    `set_alpha_to_one` is used by DDIM only, `clip_sample` and `clip_sample_range` by DDIM and LCM,
    `original_inference_steps` and `timestep_scaling` by LCM only (defaults: diffusers' LCMScheduler's;
    SD1.5's file has neither).
    """

    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self):
        for key, allowed, optional in (
            ("beta_schedule", BETA_SCHEDULES, True),
            ("prediction_type", PREDICTION_TYPES, False),
            ("timestep_spacing", SPACINGS, True),
        ):
            if getattr(self, key) not in allowed and not (optional and getattr(self, key) is None):
                raise ValueError(
                    f"scheduler config: {key}={getattr(self, key)!r} is not supported; use one of {allowed}"
                )
        for key, ok, what in (
            ("num_train_timesteps", _is_int(self.num_train_timesteps) and self.num_train_timesteps >= 1,
             "an integer >= 1"),
            ("steps_offset", _is_int(self.steps_offset) and self.steps_offset >= 0, "an integer >= 0"),
            ("beta_start", self.beta_start is None or _is_real(self.beta_start) and 0 < self.beta_start < 1,
             "a number in (0, 1)"),
            ("beta_end", self.beta_end is None or _is_real(self.beta_end) and 0 < self.beta_end < 1, "a number in (0, 1)"),
            ("clip_sample_range", _is_real(self.clip_sample_range) and self.clip_sample_range > 0,
             "a number > 0"),
            ("original_inference_steps", _is_int(self.original_inference_steps) and self.original_inference_steps >= 1,
             "an integer >= 1"),
            ("timestep_scaling", _is_real(self.timestep_scaling) and math.isfinite(self.timestep_scaling)
             and self.timestep_scaling > 0, "a finite number > 0"),
            ("set_alpha_to_one", isinstance(self.set_alpha_to_one, bool), "true or false"),
            ("clip_sample", isinstance(self.clip_sample, bool) or self.clip_sample is None, "true or false"),
        ):
            if not ok:
                raise ValueError(f"scheduler config: {key}={getattr(self, key)!r} must be {what}")

    @classmethod
    def from_dict(cls, config: dict) -> SchedulerConfig:
        """Keep the keys we use; others (`_class_name`, `skip_prk_steps`, ...) do not change the math."""
        if not isinstance(config, dict):
            raise ValueError(f"scheduler config: expected a JSON object of settings, got {type(config).__name__}")
        for key, off in UNSUPPORTED.items():
            if config.get(key, off) != off:
                raise ValueError(
                    f"scheduler config: {key}={config[key]!r} is not supported by musev_lite's samplers; "
                    f"remove the key or set it to {json.dumps(off)}"
                )
        return config_from_dict(cls, config)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SchedulerConfig:
        path = Path(path)
        try:
            config = parse_nested(json.loads, path.read_text(), str(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read scheduler config ({err})") from None
        try:
            return cls.from_dict(config)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def alphas_cumprod(self, defaults: tuple[float, float, str] = EULER_BETAS) -> torch.Tensor:
        """Cumulative product of (1 - beta_t), in float32 as diffusers computes it; `defaults` (beta_start,
        beta_end, beta_schedule) are the sampler's for the keys the file lacks."""
        n = self.num_train_timesteps
        start, end, schedule = (given if given is not None else default for given, default in
                                zip((self.beta_start, self.beta_end, self.beta_schedule), defaults))
        if schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        else:  # scaled_linear: linear in sqrt(beta)
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        return torch.cumprod(1.0 - betas, dim=0)


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def spaced_timesteps(config: SchedulerConfig, num_steps: int, spacing: str) -> np.ndarray:
    """The `num_steps` training timesteps to visit, noisiest first (float64; linspace's may be fractional).

    Same numbers as diffusers. One difference: for some step counts (61, 103, ... of 1000) diffusers'
    trailing `arange` yields one timestep too many (-1); we keep the first `num_steps`.
    """
    n = config.num_train_timesteps
    if not _is_int(num_steps) or not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be an integer in 1..{n} (num_train_timesteps), got {num_steps!r}")
    if spacing == "linspace":
        timesteps = np.linspace(0, n - 1, num_steps)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + config.steps_offset
    else:  # trailing
        timesteps = np.round(np.arange(n, 0, -n / num_steps))[:num_steps] - 1
    if timesteps[0] > n - 1:
        raise ValueError(
            f"num_steps={num_steps} with steps_offset={config.steps_offset} starts at timestep "
            f"{timesteps[0]:g}, past the last training timestep {n - 1}; use fewer steps or steps_offset=0"
        )
    return timesteps


def video_fusion_noise(
    shape: Sequence[int], generator: torch.Generator | None, w_ind_noise: float = 0.5, **tensor_kw
) -> torch.Tensor:
    """VideoFusion noise (docs/method.md#starting-noise): one draw shared by all frames plus an
    independent draw per frame.

    Every pair of frames is correlated by `1 - w_ind_noise`. Draw order (common, then individual)
    matches the original, so a seeded generator gives the same tensors.
    """
    b, c, t, h, w = shape
    common = torch.randn((b, c, 1, h, w), generator=generator, **tensor_kw)
    individual = torch.randn((b, c, t, h, w), generator=generator, **tensor_kw)
    return math.sqrt(1 - w_ind_noise) * common + math.sqrt(w_ind_noise) * individual


class EulerSampler:
    """Deterministic Euler over sigmas (diffusers' EulerDiscreteScheduler with s_churn = 0).

    MuseV's own Euler subclass also draws a noise tensor from the pipeline's generator at every step,
    of its `noise_type` (VideoFusion for videos, plain for a single frame), and with s_churn = 0 never
    uses it. `step(..., generator)` draws and drops the same tensor: the latents do not depend on it,
    but a seeded generator then continues exactly as in the original (the next shot's noise).
    """

    def __init__(self, config: SchedulerConfig, num_steps: int, noise_type: str = "random"):
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type {noise_type!r} is unknown; use one of {NOISE_TYPES}")
        self.config, self.noise_type = config, noise_type
        spacing = config.timestep_spacing or "linspace"
        timesteps = spaced_timesteps(config, num_steps, spacing).astype(np.float32)
        alphas_cumprod = config.alphas_cumprod()
        train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)  # fractional t: linear
        self.timesteps = torch.from_numpy(timesteps)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (N+1,), last 0
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
        if generator is not None:  # MuseV's unused draw (see the class docstring)
            if self.noise_type == "video_fusion":
                video_fusion_noise(x.shape, generator)
            else:
                torch.randn(x.shape, generator=generator)
        return (x + derivative * (sigma_next - sigma)).to(model_output.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return x0 + noise * self.sigmas[i].to(x0.dtype)


class DDIMSampler:
    """DDIM (diffusers' DDIMScheduler): deterministic at eta = 0, adds fresh noise for eta > 0."""

    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig, num_steps: int, eta: float = 0.0):
        if not _is_real(eta) or eta < 0:
            raise ValueError(f"eta must be a number >= 0 (0 = deterministic DDIM), got {eta!r}")
        self.config, self.eta = config, eta
        spacing = config.timestep_spacing or "leading"
        timesteps = spaced_timesteps(config, num_steps, spacing)
        self.timesteps = torch.from_numpy(timesteps.round().astype(np.int64))
        self.alphas_cumprod = config.alphas_cumprod()
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        # diffusers steps back by this fixed stride whatever the spacing (so with linspace/trailing the
        # previous timestep is not always the next one in `timesteps`); kept for equal results
        self.stride = config.num_train_timesteps // num_steps

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        """For eta > 0 the variance noise is drawn from `generator` (the global RNG when None) with the
        model output's shape and dtype, on the generator's device, as diffusers does."""
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
        if self.config.clip_sample is not False:  # None (not in the file): DDIM's default, clip
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = self.eta * variance**0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            device = generator.device if generator is not None else model_output.device
            noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype, device=device)
            x_prev = x_prev + std * noise.to(model_output.device)
        return x_prev

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        a = self.alphas_cumprod[int(self.timesteps[i])].to(x0.dtype)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise


class LCMSampler:
    """Latent Consistency Model sampling (diffusers' LCMScheduler), what MuseV swaps in with an LCM-LoRA.

    The timesteps are a subset of the `original_inference_steps` (50) evenly spaced ones the LCM was
    distilled on (k = num_train_timesteps // 50: 999, 979, ..., 19), picked at floor(linspace(0, 50, N))
    positions: 4 steps visit 999, 759, 499, 259. Each step maps the noise prediction to the consistency
    function's output `denoised` = c_out(t) x0_hat + c_skip(t) x, whose boundary-condition scalings of
    the timestep scaled by `timestep_scaling` (10) and sigma_data = 0.5 make it x0_hat but for a sliver,
    then noises it afresh to the next timestep; the last step returns `denoised` and draws nothing.

    The fresh noise comes from the step's generator, with the model output's shape and dtype, on the
    generator's device, as MuseV's LCMScheduler draws it: plain noise for a single frame, VideoFusion
    noise (`noise_type="video_fusion"`, its `w_ind_noise`) for a video.
    """

    init_noise_sigma = 1.0
    sigma_data = 0.5

    def __init__(self, config: SchedulerConfig, num_steps: int, noise_type: str = "random", w_ind_noise: float = 0.5):
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type {noise_type!r} is unknown; use one of {NOISE_TYPES}")
        original = config.original_inference_steps
        if original > config.num_train_timesteps:
            raise ValueError(f"scheduler config: original_inference_steps={original} is more than "
                             f"num_train_timesteps={config.num_train_timesteps}; use at most that many")
        if not _is_int(num_steps) or not 1 <= num_steps <= original:
            raise ValueError(f"the 'lcm' sampler takes 1..{original} steps (its original_inference_steps; "
                             f"4-8 is what LCM is for), got {num_steps!r}")
        self.config, self.noise_type, self.w_ind_noise = config, noise_type, w_ind_noise
        k = config.num_train_timesteps // original
        distilled = (np.arange(1, original + 1) * k - 1)[::-1]
        picked = np.floor(np.linspace(0, original, num_steps, endpoint=False)).astype(np.int64)
        self.timesteps = torch.from_numpy(distilled[picked].copy())
        self.alphas_cumprod = config.alphas_cumprod(LCM_BETAS)
        scaled = self.timesteps * float(config.timestep_scaling)  # float32, as diffusers scales its timestep tensor
        self.c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        self.c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def denoised(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The consistency function's output at step `i`: c_out x0_hat + c_skip x."""
        a_t = self.alphas_cumprod[int(self.timesteps[i])]
        b_t = 1 - a_t
        if self.config.prediction_type == "epsilon":
            x0 = (x - b_t.sqrt() * model_output) / a_t.sqrt()
        else:  # v_prediction
            x0 = a_t.sqrt() * x - b_t.sqrt() * model_output
        if self.config.clip_sample:  # None (not in the file): LCM's default, no clipping
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return self.c_out[i] * x0 + self.c_skip[i] * x

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        """`denoised` noised to the next timestep with noise drawn from `generator` (the global RNG when
        None); at the last step `denoised` itself."""
        denoised = self.denoised(model_output, i, x)
        if i == len(self.timesteps) - 1:
            return denoised
        a_prev = self.alphas_cumprod[int(self.timesteps[i + 1])]
        draw = dict(dtype=model_output.dtype, device=generator.device if generator is not None else model_output.device)
        if self.noise_type == "video_fusion":
            noise = video_fusion_noise(model_output.shape, generator, self.w_ind_noise, **draw)
        else:
            noise = torch.randn(model_output.shape, generator=generator, **draw)
        return a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * noise.to(model_output.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        a = self.alphas_cumprod[int(self.timesteps[i])].to(x0.dtype)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def make_sampler(name: str, config: SchedulerConfig, num_steps: int, eta: float = 0.0, noise_type: str = "random",
                 w_ind_noise: float = 0.5):
    """"euler" (MuseV's default), "ddim" or "lcm" (for an LCM-LoRA, 4-8 steps); `eta` applies to DDIM only.
    `noise_type`: what MuseV's Euler (drawn and dropped) and LCM (added) draw at every step, "video_fusion"
    for videos, with `w_ind_noise` its share of per-frame noise."""
    if name == "ddim":
        return DDIMSampler(config, num_steps, eta)
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown; use one of {SAMPLERS}")
    if eta != 0:
        raise ValueError(f"eta={eta!r} only applies to the 'ddim' sampler; {name!r} here takes no eta (eta 0)")
    if name == "euler":
        return EulerSampler(config, num_steps, noise_type)
    return LCMSampler(config, num_steps, noise_type, w_ind_noise)

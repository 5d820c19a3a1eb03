"""Visual-conditioned parallel denoising, MuseV's way of making a long video in one pass.

The video's latent frames are cut into overlapping windows. At every sampler step, every window is
denoised at the same noise level, each with the clean latent of the condition image prefixed at its
local frame 0, and the noise predictions of overlapping windows are averaged frame by frame. No window
waits for a finished neighbour, so errors do not pile up along the video (MuseV README's "parallel
denoising" figure; docs/method.md#parallel-denoising).

    windows = context_windows(...)                 # which frames each UNet call sees
    latents = initial_latents(...)                 # VideoFusion noise, nudged toward the image
    latents = parallel_denoise(unet, latents, ...) # the loop
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .distributed import Ranks
from .settings import CONTEXT_SCHEDULES, GUIDANCE_METHODS
from .unet import Conditioning, ControlResiduals


# ---------------------------------------------------------------------------------------------
# Windows (docs/method.md#windows)


def uniform_v2_windows(num_frames: int, context_frames: int, overlap: int) -> list[list[int]]:
    """Plain sliding windows starting every `context_frames - overlap` frames; the last may be short."""
    stride = context_frames - overlap
    return [
        list(range(start, min(start + context_frames, num_frames)))
        for start in range(0, num_frames, stride)
    ]


def uniform_windows(num_frames: int, context_frames: int, overlap: int) -> list[list[int]]:
    """Full-length windows every `context_frames - overlap` frames; the tail wraps round to frame 0.

    This is the original's "uniform" schedule at step 0 with context_stride 1, the only way it is
    ever called; its ordered-halving shift and multi-stride levels are then inert.
    """
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    stride = context_frames - overlap
    return [
        [frame % num_frames for frame in range(start, start + context_frames)]
        for start in range(0, num_frames, stride)
    ]


def context_windows(
    schedule: str, num_frames: int, context_frames: int = 12, overlap: int = 4
) -> list[list[int]]:
    """The windows a whole pipeline call iterates over, at every step."""
    if schedule not in CONTEXT_SCHEDULES:
        raise ValueError(f"context_schedule {schedule!r} is unknown; use one of {CONTEXT_SCHEDULES}")
    if not 0 <= overlap < context_frames:
        raise ValueError(
            f"context_overlap ({overlap}) must be >= 0 and smaller than context_frames ({context_frames})"
        )
    make = uniform_v2_windows if schedule == "uniform_v2" else uniform_windows
    windows = make(num_frames, context_frames, overlap)
    # A last window ending on the same frame as the one before adds nothing: drop it (as the original).
    if len(windows) >= 2 and windows[-1][-1] == windows[-2][-1]:
        windows = windows[:-1]
    return windows


# ---------------------------------------------------------------------------------------------
# Starting noise (docs/method.md#starting-noise)


def video_fusion_noise(
    shape: Sequence[int], generator: torch.Generator | None, w_ind_noise: float = 0.5, **tensor_kw
) -> torch.Tensor:
    """VideoFusion noise: one draw shared by all frames plus an independent draw per frame.

    Every pair of frames is correlated by `1 - w_ind_noise`. Draw order (common, then individual)
    matches the original, so a seeded generator gives the same tensors.
    """
    b, c, t, h, w = shape
    common = torch.randn((b, c, 1, h, w), generator=generator, **tensor_kw)
    individual = torch.randn((b, c, t, h, w), generator=generator, **tensor_kw)
    return math.sqrt(1 - w_ind_noise) * common + math.sqrt(w_ind_noise) * individual


def initial_latents(
    shape: Sequence[int],
    generator: torch.Generator | None,
    init_noise_sigma: float,
    w_ind_noise: float = 0.5,
    condition_latent: torch.Tensor | None = None,
    img_weight: float = 1e-3,
    **tensor_kw,
) -> torch.Tensor:
    """x_T for image/text-to-video: VideoFusion noise mixed with the condition latent, times sigma_max.

    `condition_latent` (B,4,n,h,w): its mean over frames is mixed in with weight sqrt(img_weight);
    this leaks a faint copy of the image into x_T, which MuseV does by default.
    """
    noise = video_fusion_noise(shape, generator, w_ind_noise, **tensor_kw)
    if condition_latent is not None and img_weight > 0:
        image = condition_latent.mean(dim=2, keepdim=True).to(noise)
        noise = math.sqrt(img_weight) * image + math.sqrt(1 - img_weight) * noise
    return noise * init_noise_sigma


# ---------------------------------------------------------------------------------------------
# Guidance schedule (docs/method.md#guidance)


def guidance_scales(start: float, num_steps: int, end: float | None = None, method: str = "linear") -> list[float]:
    """Classifier-free guidance scale per step: constant unless `end` is given."""
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"guidance_method {method!r} is unknown; use one of {GUIDANCE_METHODS}")
    if end is None or end == start:
        return [float(start)] * num_steps
    if method == "linear":
        return [float(g) for g in np.linspace(start, end, num_steps)]
    if method == "two_stage":
        first = num_steps // 2
        return [float(start)] * first + [float(end)] * (num_steps - first)
    if method == "fix_two_stage":
        first = min(3, num_steps)
        return [float(start)] * first + [float(end)] * (num_steps - first)
    third = num_steps // 3  # three_stage; the middle value uses floor division, as the original
    return [float(start)] * third + [float((start + end) // 2)] * third + [float(end)] * (num_steps - 2 * third)


# ---------------------------------------------------------------------------------------------
# The loop (docs/method.md#parallel-denoising)


def window_groups(windows: list[list[int]], window_batch: int) -> list[list[list[int]]]:
    """Windows that go through the UNet together: consecutive ones, at most `window_batch` per call
    (shorter ones are padded in the call, see `parallel_denoise`)."""
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    return [windows[i : i + window_batch] for i in range(0, len(windows), window_batch)]


def padded(group: list[list[int]]) -> list[list[int]]:
    """The windows of a group brought to the longest one's length by repeating their last frame."""
    length = max(len(window) for window in group)
    return [window + window[-1:] * (length - len(window)) for window in group]


@dataclass
class WindowControl:
    """ControlNet conditioning of a video (video2video, docs/method.md#video2video).

    `frames[j]` (F, H, W, 3) uint8 are net j's control images: frame 0 belongs to the condition frame,
    frame 1 + f to latent frame f. For every window the net(s) see the same frames the UNet sees (the
    clean condition latent first), with control images [frame 0] + [1 + f for f in window], on both
    guidance halves and with the text only (no IP tokens), as MuseV runs its ControlNet.
    """

    net: Callable[..., ControlResiduals]  # controlnet.MultiControlNet
    frames: list[torch.Tensor]
    scales: list[float]
    start: float = 0.0  # share of the steps before the ControlNet starts (control_guidance_start)
    end: float = 1.0  # ... and after which it stops (control_guidance_end)

    def residuals(self, sample: torch.Tensor, t, cond: Conditioning, group: list[list[int]], step: int,
                  steps: int) -> ControlResiduals | None:
        """Residuals for a UNet call on `sample` (2 k b, 4, 1 + L, h, w) holding the windows of `group`."""
        if step / steps < self.start or (step + 1) / steps > self.end:  # as diffusers' controlnet_keep
            return None
        k, n = len(group), sample.shape[2]
        b = sample.shape[0] // (2 * k)
        frames = sample.transpose(1, 2).flatten(0, 1)  # ((2 k b) n) 4 h w, the UNet's frame order
        text = cond.text.repeat_interleave(n, 0)  # one text row per frame
        index = torch.tensor([[0] + [1 + f for f in window] for window in group])  # k n
        images = []
        for video in self.frames:
            chosen = video[index].permute(0, 1, 4, 2, 3).to(frames.device, torch.float32) / 255  # k n 3 H W
            chosen = chosen.repeat_interleave(b, 0).repeat(2, 1, 1, 1, 1)  # (2 k b) n 3 H W: both halves alike
            images.append(chosen.flatten(0, 1))
        return self.net(frames, t, text, images, self.scales)


def parallel_denoise(
    unet: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    condition_latent: torch.Tensor,
    cond: Conditioning,
    sampler,
    windows: list[list[int]],
    guidance: Sequence[float],
    window_batch: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    temporal: bool = True,
    control: WindowControl | None = None,
    start: int = 0,
    ranks: Ranks | None = None,
) -> torch.Tensor:
    """Denoise `latents` (B,4,T,h,w) window by window, every step, around a clean condition frame.

    unet(sample, t, cond, condition_frames=n, temporal=...) -> noise prediction, same shape as sample.
    `condition_latent` (B,4,n,h,w) is the clean latent of the condition image(s), put in front of every
    window on both guidance halves; `cond` is batched [uncond; cond] (2B). Windows are stacked along the
    batch, `window_batch` per call; a shorter window is padded to the longest and the call gets
    `lengths=` (real frames per sample), with which the UNet's temporal layers see each window as if
    alone. The result equals the one-window-at-a-time loop of the original. `generator` goes to the
    sampler's step (MuseV's Euler draws from it). `control` adds ControlNet residuals per window; `start`
    skips the first sampler steps (SDEdit strength). `ranks` (distributed.py): this process denoises its
    share of the windows, the prediction sums of all ranks' windows are added up, and every rank takes
    the same step.
    """
    n_cond = condition_latent.shape[2]
    count = torch.zeros(latents.shape[2], dtype=latents.dtype, device=latents.device)
    for window in windows:  # how many windows average into each frame
        count[torch.tensor(window, device=latents.device)] += 1
    groups = window_groups(windows if ranks is None else ranks.windows(windows), window_batch)  # distributed: mine
    # what does not change from step to step, per call: its windows padded to one length, the UNet's
    # `lengths=` when they are uneven (real frames per sample), and each window's frame indices
    b = latents.shape[0]
    calls = [(group, padded(group),
              {"lengths": [n_cond + len(w) for w in group for _ in range(b)] * 2} if len({len(w) for w in group}) > 1 else {},
              [torch.tensor(w, device=latents.device) for w in group]) for group in groups]
    steps = len(sampler.timesteps)
    for i in range(start, steps):
        t = sampler.timesteps[i]
        noise_sum = torch.zeros((2 * latents.shape[0], *latents.shape[1:]), dtype=latents.dtype, device=latents.device)
        for group, frames, lengths, indices in calls:
            k = len(group)
            x = torch.cat([latents[:, :, w] for w in frames])  # (k b) 4 L h w, window-major
            x = sampler.scale_model_input(torch.cat([x, x]), i)  # [uncond; cond]
            condition = condition_latent.repeat(2 * k, 1, 1, 1, 1).to(x)  # clean, unscaled
            sample = torch.cat([condition, x], dim=2)  # (2 k b) 4 (n+L) h w: condition at frame 0
            call_cond = cond.repeat(k)
            if control is not None:
                call_cond = dataclasses.replace(call_cond, control=control.residuals(sample, t, call_cond, frames, i, steps))
            noise = unet(sample, t, call_cond, condition_frames=n_cond, temporal=temporal, **lengths)
            noise = noise[:, :, n_cond:]  # the condition frame's prediction is not used
            uncond, cond_noise = noise.chunk(2)
            for j, (window, index) in enumerate(zip(group, indices)):
                rows, real = slice(j * b, (j + 1) * b), slice(0, len(window))  # a padded window's tail is dropped
                noise_sum.index_add_(2, index, torch.cat([uncond[rows, :, real], cond_noise[rows, :, real]]))
        if ranks is not None:  # distributed: add the other ranks' windows
            ranks.all_reduce(noise_sum, f"denoising step {i + 1}/{steps}")
        noise_pred = noise_sum / count.view(1, 1, -1, 1, 1)  # flat average over overlapping windows
        uncond, cond_noise = noise_pred.chunk(2)
        noise_pred = uncond + guidance[i] * (cond_noise - uncond)
        latents = sampler.step(noise_pred, i, latents, generator)
        if callback is not None:
            callback(i, latents)
    return latents

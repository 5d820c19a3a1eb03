"""Visual-conditioned parallel denoising, MuseV's way of making a long video in one pass.

The video's latent frames are cut into overlapping windows. At every sampler step, every window is
denoised at the same noise level, each with the clean latent of the condition image prefixed at its
local frame 0, and the noise predictions of overlapping windows are averaged frame by frame. No window
waits for a finished neighbour, so errors do not pile up along the video (MuseV README's "parallel
denoising" figure; docs/method.md#parallel-denoising).

    windows = context_windows(...)                         # which frames each UNet call sees
    latents = initial_latents(...)                         # VideoFusion noise, nudged toward the image
    denoiser = WindowedDenoiser(unet, latents, ...)        # the windows' UNet calls, set up once
    latents = sample(denoiser, sampler, latents)           # the loop: denoiser, then sampler step
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .controlnet import controlnet_keep
from .distributed import Ranks
from .samplers import video_fusion_noise
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
# The denoisers and the loop (docs/method.md#parallel-denoising)


def window_groups(windows: list[list[int]], window_batch: int) -> list[list[list[int]]]:
    """Windows that go through the UNet together: consecutive ones, at most `window_batch` per call
    (shorter ones are padded in the call, see `WindowedDenoiser`)."""
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
        if not controlnet_keep(step, steps, self.start, self.end):
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


@dataclass(frozen=True)
class WindowCall:
    """One UNet call of every sampler step: consecutive windows stacked along the batch, worked out once."""

    windows: list[list[int]]  # each window's frames (indices into the latents)
    padded: list[list[int]]  # the same, brought to one length by `padded`
    lengths: list[int] | None  # the UNet's `lengths=` (real frames per sample) when the windows are uneven
    indices: list[torch.Tensor]  # each window's frames as a tensor on the latents' device, to add its noise up

    @classmethod
    def of(cls, group: list[list[int]], batch: int, condition_frames: int, device) -> WindowCall:
        uneven = len({len(window) for window in group}) > 1  # both halves' samples: uncond, then cond
        lengths = [condition_frames + len(w) for w in group for _ in range(batch)] * 2 if uneven else None
        return cls(group, padded(group), lengths, [torch.tensor(window, device=device) for window in group])


def guide(noise: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of a noise prediction batched [uncond; cond]."""
    uncond, cond = noise.chunk(2)
    return uncond + scale * (cond - uncond)


class WindowedDenoiser:
    """The guided noise prediction for a video's latents, window by window (docs/method.md#parallel-denoising).

    unet(sample, t, cond, condition_frames=n, lengths=...) -> noise prediction, same shape as sample.
    `x` (B,4,T,h,w): the latents it will be called on (their shape, dtype and device). `condition_latent`
    (B,4,n,h,w) is the clean latent of the condition image(s), put in front of every window on both
    guidance halves; `cond` is batched [uncond; cond] (2B). Windows are stacked along the batch,
    `window_batch` per call (`WindowCall`, set up here once); a shorter window is padded to the longest
    and the call gets `lengths=`, with which the UNet's temporal layers see each window as if alone. The
    result equals the one-window-at-a-time loop of the original. `control` adds ControlNet residuals per
    window. `ranks` (distributed.py): this process denoises its share of the windows and the prediction
    sums of all ranks' windows are added up, so every rank gets the same prediction.
    """

    def __init__(self, unet: Callable[..., torch.Tensor], x: torch.Tensor, condition_latent: torch.Tensor,
                 cond: Conditioning, sampler, windows: list[list[int]], guidance: Sequence[float],
                 window_batch: int = 1, control: WindowControl | None = None, ranks: Ranks | None = None):
        self.unet, self.condition_latent, self.cond, self.sampler = unet, condition_latent, cond, sampler
        self.guidance, self.control, self.ranks = guidance, control, ranks
        count = torch.zeros(x.shape[2], dtype=x.dtype, device=x.device)
        for window in windows:
            count[torch.tensor(window, device=x.device)] += 1
        self.count = count.view(1, 1, -1, 1, 1)  # how many windows average into each frame
        mine = windows if ranks is None else ranks.windows(windows)  # distributed: this rank's share
        self.calls = [WindowCall.of(group, x.shape[0], condition_latent.shape[2], x.device)
                      for group in window_groups(mine, window_batch)]

    @property
    def calls_per_step(self) -> int:
        return len(self.calls)

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The guided noise prediction for `x` at sampler step `i`, same shape as `x`."""
        noise_sum = torch.zeros((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # [uncond; cond]
        for call in self.calls:
            for index, noise in zip(call.indices, self.window_noise(call, x, i)):
                noise_sum.index_add_(2, index, noise)
        if self.ranks is not None:  # distributed: add the other ranks' windows
            self.ranks.all_reduce(noise_sum, f"denoising step {i + 1}/{len(self.sampler.timesteps)}")
        return guide(noise_sum / self.count, self.guidance[i])

    def window_noise(self, call: WindowCall, x: torch.Tensor, i: int) -> list[torch.Tensor]:
        """One UNet (and ControlNet) call on the windows of `call`: each window's noise prediction for its
        own frames, [uncond; cond] (2B, 4, len(window), h, w)."""
        n, k, b = self.condition_latent.shape[2], len(call.windows), x.shape[0]
        t, steps = self.sampler.timesteps[i], len(self.sampler.timesteps)
        frames = torch.cat([x[:, :, window] for window in call.padded])  # (k b) 4 L h w, window-major
        frames = self.sampler.scale_model_input(torch.cat([frames, frames]), i)  # [uncond; cond]
        condition = self.condition_latent.repeat(2 * k, 1, 1, 1, 1).to(frames)  # clean, unscaled
        unet_input = torch.cat([condition, frames], dim=2)  # (2 k b) 4 (n+L) h w: condition at frame 0
        cond = self.cond.repeat(k)
        if self.control is not None:
            control = self.control.residuals(unet_input, t, cond, call.padded, i, steps)
            cond = dataclasses.replace(cond, control=control)
        noise = self.unet(unet_input, t, cond, condition_frames=n, lengths=call.lengths)
        uncond, cond_noise = noise[:, :, n:].chunk(2)  # the condition frames' prediction is not used
        rows = [slice(j * b, (j + 1) * b) for j in range(k)]  # window j's samples in each half
        return [torch.cat([uncond[r, :, : len(w)], cond_noise[r, :, : len(w)]])  # a padded window's tail dropped
                for r, w in zip(rows, call.windows)]


@dataclass
class ImageDenoiser:
    """The guided noise prediction for one frame (B,4,1,h,w) in 2D mode (temporal layers off, no condition
    frame): one UNet call on [uncond; cond]. The drawn first frame (docs/method.md#the-first-frame)."""

    unet: Callable[..., torch.Tensor]
    cond: Conditioning
    sampler: object
    guidance: Sequence[float]
    calls_per_step = 1

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        unet_input = self.sampler.scale_model_input(torch.cat([x, x]), i)  # [uncond; cond]
        noise = self.unet(unet_input, self.sampler.timesteps[i], self.cond, condition_frames=0, temporal=False)
        return guide(noise, self.guidance[i])


def sample(denoiser: Callable[[torch.Tensor, int], torch.Tensor], sampler, x: torch.Tensor,
           generator: torch.Generator | None = None, start: int = 0,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """The sampler loop (docs/method.md#parallel-denoising): from step `start` (0, or later for SDEdit's
    strength) to the last, the denoiser's guided noise prediction for `x`, then one sampler step.
    `generator` goes to the step (MuseV's Euler draws from it); `callback(i, x)` after every step."""
    for i in range(start, len(sampler.timesteps)):
        noise = denoiser(x, i)
        x = sampler.step(noise, i, x, generator)
        if callback is not None:
            callback(i, x)
    return x

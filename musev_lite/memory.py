"""How much memory a generation needs, roughly, and how much there is: a size the machine cannot hold
is refused before the work starts, not met by an allocation failure after it.

`estimate_memory` adds up, in bytes, beyond the loaded weights (UNET_FACTOR and VAE_FACTOR measured by
bench/bench_memory.py as the peak growth of the resident set, then rounded up; the copies counted):

    UNet window call  2 x (windows per call x (1 + window frames))    (the largest call, both guidance halves)
                      x sum over UNet levels l of channels_l x (h / 2^l) x (w / 2^l)  (h, w: latent size)
                      x UNET_FACTOR x bytes of model.dtype          (x 1.5 with a ControlNet beside it)
    latents           frames x 4 x h x w x 4 bytes x LATENT_COPIES
    decoding          decode_chunk frames (8; fewer above 256x160) x H x W x (mean of the VAE's first two
                      widths) x 4 bytes x VAE_FACTOR
    frames            (frames + control frames) x H x W x 3 bytes x FRAME_COPIES

where frames is the plan's video length (`GenerationPlan.total_frames`) and H, W the video's size.
Windows are denoised one call at a time, so the UNet part does not grow with the video's length; the
latents and frames do. The estimate is rough and errs high: for a whole tiny call (384x384 and 512x320,
25 frames) it was 1.26-1.35x the measured peak. A first look takes the UNet call as one window (a lower
bound that needs no list of windows), so an absurd length is refused at once, before its windows are listed.
"""

from __future__ import annotations

import ctypes
import math
import re
from pathlib import Path

import torch

from .plan import GenerationPlan
from .settings import ConfigError
from .vae import decode_chunk

UNET_FACTOR = 32  # measured 23.3-25.4 at the tiny preset, 25.5-29.4 with SD1.5's channel doubling (64-256)
VAE_FACTOR = 6  # measured 5.3-5.6 for the tiny VAE, 4.7 for SD's VAE
LATENT_COPIES = 8  # the video's latents, their noise, the window sums of both halves, the shots joined
FRAME_COPIES = 3  # the decoded uint8 frames and the copies a writer (GIF/WebP) makes of them


def estimate_memory(pipe, plan: GenerationPlan, windows_listed: bool = True) -> dict[str, int]:
    """Bytes a `pipe` call of this plan needs beyond its weights, by part (the formula above).
    `windows_listed=False`: without listing the windows, the UNet call as one window of at most
    context_frames frames, a lower bound (check_memory's first look)."""
    (h, w), frames = plan.latent_hw, plan.total_frames
    vae_width = sum(pipe.vae.config.block_out_channels[:2]) / 2
    return {
        "UNet window call": unet_call_memory(pipe, plan, windows_listed),
        "latents": frames * 4 * h * w * 4 * LATENT_COPIES,
        "decoding": int(min(decode_chunk(plan.height, plan.width), frames) * plan.height * plan.width * vae_width * 4 * VAE_FACTOR),
        "frames": (frames + plan.control_frames) * plan.height * plan.width * 3 * FRAME_COPIES,
    }


def return_freed_memory() -> None:
    """Give back to the system the memory that freed tensors left in the C allocator's arenas (glibc's
    malloc_trim; nothing where the C library has none). Without it the denoising's activations, about
    1.4 GB at 512x320, stay in the resident set under the decode's own (bench/time_to_video.py)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def unet_call_memory(pipe, plan: GenerationPlan, windows_listed: bool = True) -> int:
    """The largest UNet call of the plan (its windows padded to one length, both guidance halves)."""
    h, w = plan.latent_hw
    if windows_listed:
        call_frames = 2 * max(len(group) * (1 + max(map(len, group)))
                              for frames in plan.windows for group in plan.unet_calls(frames))
    else:
        call_frames = 2 * (1 + min(plan.config.context_frames, max(plan.shot_frames)))
    positions = sum(c * math.ceil(h / 2**level) * math.ceil(w / 2**level)
                    for level, c in enumerate(pipe.unet.config.block_out_channels))
    return int(call_frames * positions * UNET_FACTOR * pipe.dtype.itemsize * (1.5 if plan.control_frames else 1))


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes free for new tensors on `device`, where that figure comes from), None where unknown (mps)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    if device.type != "cpu":
        return None
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    if not found:
        return None
    free, source = int(found.group(1)) * 1024, "MemAvailable in /proc/meminfo"
    try:  # a container's own limit (cgroup v2), which /proc/meminfo does not show
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        if limit != "max" and int(limit) - int(used) < free:
            free, source = int(limit) - int(used), "the container's memory.max"
    except (OSError, ValueError):
        pass
    return free, source


FIXES = {
    "UNet window call": "lower generation.height/width, generation.context_frames or generation.window_batch, "
                        'or set model.dtype = "bfloat16"',
    "latents": "lower generation.num_frames or generation.n_batch, or generation.height/width",
    "decoding": "lower generation.height/width",
    "frames": "lower generation.num_frames or generation.n_batch, or generation.height/width",
}


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_memory(pipe, plan: GenerationPlan) -> None:
    """ConfigError if `estimate_memory` exceeds what `available_memory` reports (on CUDA the frames are
    counted against the host's memory, the rest against the GPU's). First with a lower bound of the UNet
    call that lists no windows, so that an absurd length is refused at once; then exactly."""
    refuse_beyond_memory(pipe, plan, estimate_memory(pipe, plan, windows_listed=False))
    refuse_beyond_memory(pipe, plan, estimate_memory(pipe, plan))


def refuse_beyond_memory(pipe, plan: GenerationPlan, need: dict[str, int]) -> None:
    pools = {pipe.device: {k: v for k, v in need.items() if pipe.device.type == "cpu" or k != "frames"}}
    if pipe.device.type != "cpu":
        pools[torch.device("cpu")] = {"frames": need["frames"]}
    for device, parts in pools.items():
        free = available_memory(device)
        if free is None or sum(parts.values()) <= free[0]:
            continue
        largest = max(parts, key=parts.get)
        detail = ", ".join(f"{part} {gb(n)}" for part, n in sorted(parts.items(), key=lambda kv: -kv[1]))
        raise ConfigError(
            f"a {plan.width}x{plan.height} video of {plan.shots} x {max(plan.shot_frames)} frames needs about "
            f"{gb(sum(parts.values()))} ({detail}) but {gb(free[0])} is available ({free[1]}); "
            f"{FIXES[largest]}")


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is running out of memory: MemoryError, torch's OutOfMemoryError, or the CPU
    allocator's RuntimeError."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)

"""How much memory a generation needs, roughly, and how much there is: a size the machine cannot hold
is refused before the work starts, not met by an allocation failure after it.

`estimate_memory` adds up, in bytes, beyond the loaded weights (UNET_FACTOR and VAE_FACTOR measured by
bench/bench_memory.py as the peak growth of the resident set, then rounded up; the copies counted):

    UNet window call  2 x (windows per call x (1 + window frames))    (the largest call, both guidance halves)
                      x sum over UNet levels l of channels_l x (h / 2^l) x (w / 2^l)  (h, w: latent size)
                      x UNET_FACTOR x bytes of model.dtype          (x 1.5 with a ControlNet beside it)
    latents           frames x 4 x h x w x 4 bytes x LATENT_COPIES
    decoding          8 frames x H x W x (mean of the VAE's first two widths) x 4 bytes x VAE_FACTOR
    frames            (frames + control frames) x H x W x 3 bytes x FRAME_COPIES

where frames = n_batch x num_frames + 1 and H, W the video's size. Windows are denoised one call at a
time, so the UNet part does not grow with the video's length; the latents and frames do. The estimate
is rough and errs high: for a whole tiny call (384x384 and 512x320, 25 frames) it was 1.26-1.35x the
measured peak.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .denoise import context_windows, window_groups
from .settings import ConfigError, GenerationConfig

UNET_FACTOR = 32  # measured 23.3-25.4 at the tiny preset, 25.5-29.4 with SD1.5's channel doubling (64-256)
VAE_FACTOR = 6  # measured 5.3-5.6 for the tiny VAE, 4.7 for SD's VAE
LATENT_COPIES = 8  # the video's latents, their noise, the window sums of both halves, the shots joined
FRAME_COPIES = 3  # the decoded uint8 frames and the copies a writer (GIF/WebP) makes of them
DECODE_CHUNK = 8  # frames the VAE decodes at a time (MuseVPipeline.decode)


def estimate_memory(pipe, height: int, width: int, config: GenerationConfig, control_frames: int = 0) -> dict[str, int]:
    """Bytes a `pipe` call of this size needs beyond its weights, by part (the formula above)."""
    g = config
    h, w = height // 8, width // 8
    frames = g.n_batch * g.num_frames + 1
    groups = window_groups(context_windows(g.context_schedule, g.num_frames, g.context_frames, g.context_overlap),
                           g.window_batch)  # a shot's UNet calls, as the denoiser groups them
    call_frames = 2 * max(len(group) * (1 + max(map(len, group))) for group in groups)  # the largest call, padded
    positions = sum(c * math.ceil(h / 2**level) * math.ceil(w / 2**level)
                    for level, c in enumerate(pipe.unet.config.block_out_channels))
    unet = call_frames * positions * UNET_FACTOR * pipe.dtype.itemsize * (1.5 if control_frames else 1)
    vae_width = sum(pipe.vae.config.block_out_channels[:2]) / 2
    return {
        "UNet window call": int(unet),
        "latents": frames * 4 * h * w * 4 * LATENT_COPIES,
        "decoding": int(min(DECODE_CHUNK, frames) * height * width * vae_width * 4 * VAE_FACTOR),
        "frames": (frames + control_frames) * height * width * 3 * FRAME_COPIES,
    }


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


def check_memory(pipe, height: int, width: int, config: GenerationConfig, control_frames: int = 0) -> None:
    """ConfigError if `estimate_memory` exceeds what `available_memory` reports (on CUDA the frames are
    counted against the host's memory, the rest against the GPU's)."""
    need = estimate_memory(pipe, height, width, config, control_frames)
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
            f"a {width}x{height} video of {config.n_batch} x {config.num_frames} frames needs about "
            f"{gb(sum(parts.values()))} ({detail}) but {gb(free[0])} is available ({free[1]}); "
            f"{FIXES[largest]}")


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is running out of memory: MemoryError, torch's OutOfMemoryError, or the CPU
    allocator's RuntimeError."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)

"""Calibrates musev_lite/memory.py: the peak growth of the resident set (Linux) while one part runs.

    python bench/bench_memory.py

Each measurement runs in a fresh process (a freed allocation would otherwise be reused and not show),
at the tiny preset with random weights (memory does not depend on the values):
  * one UNet window call (both guidance halves, condition frame + 12 frames, IP-Adapter and
    ReferenceNet features) -> its factor: bytes / (frames in the call x sum of channels x positions
    over the UNet levels x bytes per value), memory.UNET_FACTOR;
  * the VAE decoding 8 frames -> bytes / (8 x H x W x mean of its first two widths x 4), memory.VAE_FACTOR;
  * a whole pipeline call, measured against memory.estimate_memory;
  * the same factors for SD1.5's structure, to check they carry over: a UNet whose channels double per
    level (64-256 instead of 320-1280), and SD's own VAE (128-512 channels, 2 frames).
"""

import gc
import math
import subprocess
import sys
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def resident(key: str) -> int:
    line = next(line for line in STATUS.read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def peak_growth(fn) -> int:
    """Bytes the resident set grew by at its peak while `fn` ran (VmHWM reset through clear_refs)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = resident("VmRSS")
    fn()
    return resident("VmHWM") - before


def measure(part: str, height: int, width: int) -> None:
    from PIL import Image

    from musev_lite.denoise import context_windows
    from musev_lite.memory import estimate_memory
    from musev_lite.pipeline import MuseVPipeline
    from musev_lite.plan import make_plan
    from musev_lite.settings import GenerationConfig
    from musev_lite.unet import UNet3D, UNet3DConfig
    from musev_lite.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    pipe, label = MuseVPipeline.demo(seed=0), part
    if part.endswith("_sd"):  # SD1.5's structure (channels doubling per level) at reduced width / SD's own VAE
        pipe.unet = UNet3D(UNet3DConfig(block_out_channels=(64, 128, 256, 256), cross_attention_dim=32)).eval()
        pipe.referencenet = pipe.image_proj = pipe.image_encoder = None
        pipe.vae = AutoencoderKL(VAEConfig()).eval()
        part = part.removesuffix("_sd")
    h, w = height // 8, width // 8
    image = Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())
    config = GenerationConfig(num_frames=12, steps=1, seed=0, motion_speed=8.0)
    with torch.no_grad():
        if part == "unet":
            cond = pipe.image_conditioning(image, image, pipe.encode_text("a face", "V1"), config)
            sample = torch.randn(2, 4, 13, h, w)
            grew = peak_growth(lambda: pipe.unet(sample, torch.tensor(500.0), cond, condition_frames=1))
            levels = pipe.unet.config.block_out_channels
            positions = sum(c * math.ceil(h / 2**n) * math.ceil(w / 2**n) for n, c in enumerate(levels))
            factor = grew / (2 * 13 * positions * 4)
        elif part == "vae":
            frames = 8 if pipe.vae.config.block_out_channels[0] < 128 else 2  # SD's VAE: 2 frames are enough
            latents = torch.randn(frames, 4, h, w)
            grew = peak_growth(lambda: pipe.vae.decode(latents, frames))
            factor = grew / (frames * height * width * sum(pipe.vae.config.block_out_channels[:2]) / 2 * 4)
        else:
            config = GenerationConfig(height=height, width=width, num_frames=24, steps=1, context_frames=12, seed=0)
            windows = context_windows(config.context_schedule, 24, 12, 4)
            grew = peak_growth(lambda: pipe("a face", image, config, negative_prompt="V1"))
            plan = make_plan(config, image, None, None, None, pipe.controlnets)[0]
            estimate = sum(estimate_memory(pipe, plan).values())
            print(f"whole call, {width}x{height}, 25 frames, {len(windows)} windows: measured {grew / 1e6:.0f} MB, "
                  f"estimated {estimate / 1e6:.0f} MB ({estimate / grew:.2f}x)")
            return
    print(f"{label} at {width}x{height}: {grew / 1e6:.0f} MB, factor {factor:.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    else:
        for part, height, width in [("unet", 256, 256), ("unet", 384, 384), ("unet", 512, 512),
                                    ("vae", 256, 256), ("vae", 512, 512), ("call", 384, 384), ("call", 512, 320),
                                    ("unet_sd", 256, 256), ("unet_sd", 256, 160), ("vae_sd", 256, 256)]:
            subprocess.run([sys.executable, __file__, part, str(height), str(width)], check=True)

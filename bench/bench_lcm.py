"""One video with LCM at 4 steps against the default Euler at 10 steps, same size, timed in one run.

    python bench/bench_lcm.py [--frames 12] [--size 256x160] [--channels 64,128,256,256] [--repeats 2]

A whole `MuseVPipeline` call (image2video: VAE encode, the text encoder, the denoising windows, decoding)
on a plain-musev UNet with SD1.5's structure at reduced width and random weights (speed does not depend on
the values; with random weights neither video means anything), in float32. The two calls are timed
interleaved (bench/timing.py: a warm-up each, then rounds of one call each); prints the host's CPU, the
load before and after, seconds per video and the ratio. LCM needs an LCM-LoRA merged to make good
videos in 4 steps; merging does not change the speed. Tests never assert times.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from musev_lite.pipeline import MuseVPipeline
from musev_lite.unet import UNet3D, UNet3DConfig
from timing import interleaved, load, median, ratio


def cpu() -> str:
    """The host's CPU model and its bfloat16 / AMX flags, from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = sorted({f for f in text.split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")})
    return f"{model} ({', '.join(flags) or 'no AVX2'})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", default="256x160", help="height x width in pixels")
    parser.add_argument("--channels", default="64,128,256,256")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of one video each, after a warm-up")
    args = parser.parse_args()
    height, width = map(int, args.size.split("x"))
    pipe = MuseVPipeline.demo(seed=0)
    config = UNet3DConfig.preset("musev")
    config.block_out_channels = tuple(map(int, args.channels.split(",")))
    config.cross_attention_dim = pipe.text_encoder.config.hidden_size
    torch.manual_seed(0)
    pipe.unet = UNet3D(config).eval()
    pipe.referencenet = pipe.image_proj = pipe.image_encoder = pipe.face_proj = None
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    common = dict(num_frames=args.frames, height=height, width=width, seed=1, negative_prompt="V1")
    calls = {
        "Euler, 10 steps (MuseV's default)": lambda: pipe("a face", image, sampler="euler", steps=10, **common),
        "LCM, 4 steps": lambda: pipe("a face", image, sampler="lcm", steps=4, **common),
    }
    print(f"{cpu()}, torch {torch.__version__}, {torch.get_num_threads()} threads; UNet {config.block_out_channels}, "
          f"{width}x{height}, {args.frames} frames + the condition frame, float32")
    print(f"before: {load()}")
    times = interleaved(calls, args.repeats)
    print(f"after:  {load()}")
    (euler, _), (lcm, _) = times.values()
    for name, (seconds, _) in times.items():
        print(f"{name}: {median(seconds):.1f} s per video ({', '.join(f'{s:.1f}' for s in seconds)})")
    print(f"LCM at 4 steps vs Euler at 10: {ratio(euler, lcm)} faster")


if __name__ == "__main__":
    main()

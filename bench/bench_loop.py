"""Speed of the parallel-denoising loop on this machine, as ratios measured in one run.

    python bench/bench_loop.py [--frames 28] [--latent 32x20] [--compile]

Compares, per sampler step, on a UNet with SD1.5's structure at reduced width (random weights; speed
does not depend on the values):
  * windows one at a time (the original MuseV loop) vs `window_batch` windows per UNet call;
  * float32 vs bfloat16;
  * eager vs torch.compile (with --compile; compiling takes minutes on a CPU).
Prints seconds per step and the ratios. Tests never assert times; this script only reports them.
"""

import argparse
import time

import torch

from musev_lite.denoise import context_windows, parallel_denoise
from musev_lite.samplers import SD15_SCHEDULER, SchedulerConfig, make_sampler
from musev_lite.unet import Conditioning, UNet3D, UNet3DConfig
from timing import seconds_per_call


def seconds_per_step(unet, latents, condition, text, windows, window_batch, steps=2, dtype=torch.float32):
    """Seconds per sampler step (mean of `steps` steps after a one-step warm-up), and the warm-up's seconds."""
    sampler = make_sampler("euler", SchedulerConfig.from_dict(SD15_SCHEDULER), 1)
    cond = Conditioning(text.to(dtype), motion_speed=8.0)

    def call(sample, t, cond, condition_frames, **kw):
        return unet(sample.to(dtype), t, cond, condition_frames=condition_frames, **kw).float()

    def one_step():
        with torch.no_grad():
            parallel_denoise(call, latents, condition, cond, sampler, windows, [3.5], window_batch)

    start = time.perf_counter()
    one_step()
    warmup = time.perf_counter() - start
    seconds, _ = seconds_per_call(one_step, repeats=steps)
    return seconds, warmup


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=28)
    parser.add_argument("--latent", default="32x20", help="latent height x width (pixels / 8)")
    parser.add_argument("--channels", default="64,128,256,256")
    parser.add_argument("--window-batch", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    h, w = map(int, args.latent.split("x"))
    cfg = UNet3DConfig.preset("musev_referencenet")
    cfg.block_out_channels = tuple(map(int, args.channels.split(",")))
    cfg.refer_fusion = cfg.ip_cross_attention = False
    torch.manual_seed(0)
    unet = UNet3D(cfg).eval()
    latents = torch.randn(1, 4, args.frames, h, w)
    condition = torch.randn(1, 4, 1, h, w)
    text = torch.randn(2, 77, cfg.cross_attention_dim)
    windows = context_windows("uniform_v2", args.frames, 12, 4)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; UNet {cfg.block_out_channels}, "
          f"latent {h}x{w}, {args.frames} frames -> {len(windows)} windows of {[len(x) for x in windows]}")
    one, _ = seconds_per_step(unet, latents, condition, text, windows, 1)
    many, _ = seconds_per_step(unet, latents, condition, text, windows, args.window_batch)
    print(f"float32, one window per call (as the original): {one:.2f} s/step")
    print(f"float32, window_batch={args.window_batch}: {many:.2f} s/step   speed-up x{one / many:.2f}")
    bf16, _ = seconds_per_step(unet.to(torch.bfloat16), latents, condition, text, windows, 1, dtype=torch.bfloat16)
    unet.float()
    print(f"bfloat16, one window per call: {bf16:.2f} s/step   speed-up vs float32 x{one / bf16:.2f}")
    if args.compile:
        fast, warmup = seconds_per_step(torch.compile(unet), latents, condition, text, windows, 1)
        print(f"torch.compile, one window per call: {fast:.2f} s/step (first step incl. compiling {warmup:.0f} s)"
              f"   speed-up vs eager x{one / fast:.2f}")


if __name__ == "__main__":
    main()

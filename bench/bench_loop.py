"""Speed of the parallel-denoising loop on this machine, as ratios measured in one run.

    python bench/bench_loop.py [--frames 28] [--latent 32x20] [--compile]

Compares, per sampler step, on a UNet with SD1.5's structure at reduced width (random weights; speed
does not depend on the values):
  * windows one at a time (the original MuseV loop) vs `window_batch` windows per UNet call;
  * float32 vs bfloat16;
  * eager vs torch.compile (with --compile; compiling takes minutes on a CPU).
The steps are timed interleaved (bench/timing.py: a warm-up step each, then rounds of one step each);
prints seconds per step, the ratios and the machine's load. Tests never assert times.
"""

import argparse
import copy
import time

import torch

from musev_lite.denoise import WindowedDenoiser, context_windows, sample
from musev_lite.samplers import SD15_SCHEDULER, SchedulerConfig, make_sampler
from musev_lite.unet import Conditioning, UNet3D, UNet3DConfig
from timing import interleaved, load, median, ratio


def step_fn(unet, latents, condition, text, windows, window_batch, dtype=torch.float32):
    """One sampler step of the parallel-denoising loop over `windows`, as a function of nothing."""
    sampler = make_sampler("euler", SchedulerConfig.from_dict(SD15_SCHEDULER), 1)
    cond = Conditioning(text.to(dtype), motion_speed=8.0)

    def call(sample, t, cond, condition_frames, **kw):
        return unet(sample.to(dtype), t, cond, condition_frames=condition_frames, **kw).float()

    denoiser = WindowedDenoiser(call, latents, condition, cond, sampler, windows, [3.5], window_batch)

    def one_step():
        with torch.no_grad():
            return sample(denoiser, sampler, latents)

    return one_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=28)
    parser.add_argument("--latent", default="32x20", help="latent height x width (pixels / 8)")
    parser.add_argument("--channels", default="64,128,256,256")
    parser.add_argument("--window-batch", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of one step each, after a warm-up")
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
    steps = {
        "float32, one window per call (as the original)": step_fn(unet, latents, condition, text, windows, 1),
        f"float32, window_batch={args.window_batch}": step_fn(unet, latents, condition, text, windows, args.window_batch),
        "bfloat16, one window per call": step_fn(copy.deepcopy(unet).to(torch.bfloat16), latents, condition, text,
                                                 windows, 1, torch.bfloat16),
    }
    if args.compile:
        compiled = step_fn(torch.compile(unet), latents, condition, text, windows, 1)
        start = time.perf_counter()
        compiled()
        print(f"torch.compile: first step incl. compiling {time.perf_counter() - start:.0f} s")
        steps["torch.compile, one window per call"] = compiled
    print(f"before: {load()}")
    times = interleaved(steps, args.repeats)
    print(f"after:  {load()}")
    base = times["float32, one window per call (as the original)"][0]
    for name, (seconds, _) in times.items():
        print(f"{name}: {median(seconds):.2f} s/step   speed-up {ratio(base, seconds)}")

if __name__ == "__main__":
    main()

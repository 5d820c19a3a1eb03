"""Speed over 1 and 2 processes (musev_lite/distributed.py): `--part steps` (the default) times denoising
steps with one video's windows shared out; `--part tasks` times whole commands on a task file.

    python bench/distributed.py [--part steps] [--frames 20] [--latent 32x20] [--steps 2] [--rounds 2]
    python bench/distributed.py --part tasks [--frames 17] [--steps 8] [--size 64x64] [--rounds 2]

`--part steps` runs, one after the other, the same steps of the denoising loop (random weights; speed does
not depend on the values) on the `tiny` preset's UNet and on a UNet with SD1.5's structure at reduced width
(64-256 channels), interleaved over `--rounds`, as:
  * 1 process, 1 thread (one "device");
  * 1 process, 2 threads (the whole 2-core machine, one process);
  * 2 processes of 1 thread each, launched by torchrun, gloo (two "devices").
and prints seconds per step, the ratios, the time of the step's one all-reduce, and the conditioning
(text, IP-Adapter image tokens, ReferenceNet) computed on every rank vs on rank 0 and broadcast.
`--worker` is the internal entry of one rank.

`--part tasks` writes a task file of 4 tasks (the `tiny` preset, examples/face.png, `--frames` new frames,
`--steps` Euler steps at `--size`, seeds 1-4) and times `python -m musev_lite.run` on it as a whole command
(start, model load, the 4 videos, their files), interleaved over `--rounds` (A, B, C, D, E, A, ...):
  A. 1 process, 1 thread;  B. 1 process, 2 threads;
  C. 2 processes x 1 thread, torchrun: whole tasks per rank (2 each, no communication);
  D. window sharing: 4 torchrun launches of 2 ranks, one task each (the ranks share its windows; with
     at least as many tasks as ranks a task file shares whole tasks, so one task per launch is how the
     command shares windows), and
  E. its baseline, the same 4 one-task launches in 1 process x 1 thread: D and E pay the same 4 starts
     and model loads, so E / D is what sharing the windows gains.
It prints the median seconds, the ratios to A and the scaling efficiency time(1 rank) / (N x time(N ranks))
for N = 1, 2 (whole tasks: A over C; windows: E over D).

Both parts print the CPU model and the load average before and after, since the machine is shared. Tests
never assert times; this script only reports them.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from musev_lite import distributed
from musev_lite.denoise import WindowedDenoiser, context_windows, sample
from musev_lite.pipeline import MuseVPipeline
from musev_lite.referencenet import ReferenceNet
from musev_lite.samplers import SD15_SCHEDULER, SchedulerConfig, make_sampler
from musev_lite.settings import GenerationConfig
from musev_lite.unet import Conditioning, UNet3D, UNet3DConfig

REDUCED = (64, 128, 256, 256)
# SD1.5's ReferenceNet maps at 512x320 (latent 64x40), one row per guidance half: what a broadcast of
# the conditioning would carry at full size (channels, latent downscale) for the 12 down maps and the mid map
FULL_REFER_MAPS = [(320, 1)] * 3 + [(320, 2), (640, 2), (640, 2), (640, 4), (1280, 4), (1280, 4), (1280, 8),
                                    (1280, 8), (1280, 8), (1280, 8)]


def unet_config(name: str) -> UNet3DConfig:
    cfg = UNet3DConfig.preset("tiny" if name == "tiny" else "musev_referencenet")
    if name == "reduced":
        cfg.block_out_channels = REDUCED
        cfg.refer_fusion = cfg.ip_cross_attention = False
    return cfg


def barrier(ranks):
    if ranks is not None:
        dist.barrier()


def step_seconds(unet, cfg, latent_hw, frames, steps, ranks) -> list[float]:
    """Wall seconds of each sampler step after a one-step warm-up, timed from one barrier to the next."""
    torch.manual_seed(0)
    h, w = latent_hw
    latents, condition = torch.randn(1, 4, frames, h, w), torch.randn(1, 4, 1, h, w)
    cond = Conditioning(torch.randn(2, 77, cfg.cross_attention_dim), motion_speed=8.0)
    windows = context_windows("uniform_v2", frames, 12, 4)
    sampler = make_sampler("euler", SchedulerConfig.from_dict(SD15_SCHEDULER), steps + 1)
    marks = []

    def call(sample, t, cond, condition_frames, **kw):
        return unet(sample, t, cond, condition_frames=condition_frames, **kw)

    def after_step(i, x):
        barrier(ranks)
        marks.append(time.perf_counter())

    with torch.no_grad():
        barrier(ranks)
        marks.append(time.perf_counter())
        denoiser = WindowedDenoiser(call, latents, condition, cond, sampler, windows, [3.5] * (steps + 1), ranks=ranks)
        sample(denoiser, sampler, latents, callback=after_step)
    return [b - a for a, b in zip(marks[1:], marks[2:])]


def all_reduce_seconds(shape, ranks, repeats=20) -> float:
    tensor = torch.zeros(shape)
    ranks.all_reduce(tensor, "warm-up")
    barrier(ranks)
    start = time.perf_counter()
    for _ in range(repeats):
        ranks.all_reduce(tensor, "bench")
    return (time.perf_counter() - start) / repeats


def conditioning_seconds(ranks, latent_hw, broadcast: bool) -> float:
    """Text + IP tokens (the demo's tiny CLIP towers) + a reduced-width ReferenceNet at the video's size:
    computed on every rank at once, or on rank 0 and broadcast to the others."""
    pipe = MuseVPipeline.demo(seed=0)
    pipe.referencenet = ReferenceNet(UNet3DConfig(block_out_channels=REDUCED, cross_attention_dim=32, heads=2,
                                                  norm_num_groups=16)).eval()
    h, w = latent_hw
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h * 8, w * 8, 3)).astype(np.uint8))
    text = torch.randn(2, 77, 32)
    with torch.no_grad():
        pipe.image_conditioning(image, image, text, GenerationConfig(motion_speed=8.0))  # warm-up
        barrier(ranks)
        start = time.perf_counter()
        if not broadcast or ranks.rank == 0:
            cond = pipe.image_conditioning(image, image, text, GenerationConfig(motion_speed=8.0))
        if broadcast:
            shapes = [t.shape for t in [cond.text, cond.ip_tokens, *cond.refer.down, cond.refer.mid]] if ranks.rank == 0 else None
            shapes = ranks.all_gather(shapes, "bench")[0]
            tensors = ([cond.text, cond.ip_tokens, *cond.refer.down, cond.refer.mid] if ranks.rank == 0
                       else [torch.empty(s) for s in shapes])
            for t in tensors:
                dist.broadcast(t, 0)
        barrier(ranks)
        return time.perf_counter() - start


def worker(args):
    ranks = distributed.init("cpu")
    torch.set_num_threads(args.threads)
    h, w = map(int, args.latent.split("x"))
    result = {"world": 1 if ranks is None else ranks.world, "threads": torch.get_num_threads()}
    for name in ("tiny", "reduced"):
        cfg = unet_config(name)
        torch.manual_seed(0)
        unet = UNet3D(cfg).eval()
        result[name] = step_seconds(unet, cfg, (h, w), args.frames, args.steps, ranks)
    if ranks is not None:
        shape = (2, 4, args.frames, h, w)
        result["all_reduce"] = {"bytes": 4 * int(np.prod(shape)), "seconds": all_reduce_seconds(shape, ranks)}
        full = (2, 4, args.frames, 40, 64)
        result["all_reduce_512x320"] = {"bytes": 4 * int(np.prod(full)), "seconds": all_reduce_seconds(full, ranks)}
        result["conditioning_every_rank"] = conditioning_seconds(ranks, (h, w), broadcast=False)
        result["conditioning_broadcast"] = conditioning_seconds(ranks, (h, w), broadcast=True)
        refer = sum(c * (64 // s) * (40 // s) for c, s in FULL_REFER_MAPS) + 1280 * 8 * 5
        floats = 2 * (refer + 77 * 768 + 4 * 768)  # both halves: maps, text, IP tokens
        tensor = torch.zeros(floats)
        barrier(ranks)
        start = time.perf_counter()
        dist.broadcast(tensor, 0)
        barrier(ranks)
        result["broadcast_full_conditioning"] = {"bytes": 4 * floats, "seconds": time.perf_counter() - start}
    if distributed.is_main():
        print("RESULT " + json.dumps(result), flush=True)
    distributed.shutdown()


def launch(args, world: int, threads: int) -> dict:
    me = [os.path.abspath(__file__), "--worker", "--threads", str(threads), "--frames", str(args.frames),
          "--latent", args.latent, "--steps", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
                                  if world > 1 else []) + me
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


TASK_NAMES = ["a", "b", "c", "d"]
TASK_FILE = """[model]
preset = "tiny"
[input]
image = "{image}"
prompt = "a face"
[generation]
num_frames = {frames}
steps = {steps}
height = {height}
width = {width}
[output]
formats = ["mp4"]
contact_sheet = false
"""


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def write_tasks(folder: Path, args, names: list[str]) -> Path:
    """A task file of the tasks `names` (seeds 1, 2, ... in the order of TASK_NAMES)."""
    height, width = map(int, args.size.split("x"))
    text = TASK_FILE.format(image=Path(__file__).resolve().parents[1] / "examples/face.png", frames=args.frames,
                            steps=args.steps, height=height, width=width)
    for name in names:
        text += f'[[task]]\nname = "{name}"\n[task.generation]\nseed = {TASK_NAMES.index(name) + 1}\n'
    path = folder / f"tasks-{'-'.join(names)}.toml"
    path.write_text(text)
    return path


def timed_command(config: Path, world: int, threads: int, out: Path) -> float:
    """Wall seconds of `python -m musev_lite.run config` (under torchrun with `world` > 1 ranks)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"] if world > 1 else []
    command = [sys.executable] + launcher + ["-m", "musev_lite.run", str(config), "--set", f"output.dir='{out}'"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    start = time.perf_counter()
    done = subprocess.run(command, env=dict(env, OMP_NUM_THREADS=str(threads)), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def tasks_part(args):
    """Setups A-E of the module docstring, interleaved over the rounds; medians, ratios, efficiencies."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        every = write_tasks(folder, args, TASK_NAMES)
        alone = [write_tasks(folder, args, [name]) for name in TASK_NAMES]
        g = GenerationConfig()  # the task file leaves the windows at their defaults
        windows = context_windows(g.context_schedule, args.frames, g.context_frames, g.context_overlap)
        split = [[len(windows[i]) for i in mine] for mine in distributed.assign_windows(windows, 2)]
        print(f"{len(TASK_NAMES)} tasks of {args.frames} new frames, {args.steps} steps, {args.size}, tiny preset: windows "
              f"of {[len(w) for w in windows]} frames; 2 ranks sharing a task's windows get {split}")
        setups = {  # label: the commands, (task file, ranks, threads)
            "A 1 process x 1 thread": [(every, 1, 1)],
            "B 1 process x 2 threads": [(every, 1, 2)],
            "C 2 ranks x 1 thread, whole tasks": [(every, 2, 1)],
            "D 2 ranks x 1 thread, windows": [(path, 2, 1) for path in alone],
            "E 1 process x 1 thread, 4 launches": [(path, 1, 1) for path in alone],
        }
        runs = {label: [] for label in setups}
        for r in range(args.rounds):  # interleaved, so a change in the machine's load hits every setup alike
            for label, commands in setups.items():
                runs[label].append(sum(timed_command(config, world, threads, folder / f"out{r}{label[0]}{n}")
                                       for n, (config, world, threads) in enumerate(commands)))
    median = {label[0]: float(np.median(seconds)) for label, seconds in runs.items()}
    print(f"\nwhole commands, seconds (median of {args.rounds} rounds):")
    for label, seconds in runs.items():
        print(f"  {label:<36} {median[label[0]]:7.2f} s   x{median['A'] / median[label[0]]:.2f} vs A   "
              f"(rounds: {', '.join(f'{x:.2f}' for x in seconds)})")
    print("scaling efficiency time(1 rank) / (N x time(N ranks)): N = 1: 1.00 by definition; N = 2: whole tasks "
          f"A / 2C = {median['A'] / (2 * median['C']):.2f}, window sharing E / 2D = {median['E'] / (2 * median['D']):.2f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("steps", "tasks"), default="steps",
                        help="steps: seconds per denoising step, windows shared; tasks: whole commands on 4 tasks")
    parser.add_argument("--frames", type=int, default=None, help="new frames (steps: 20 -> two windows of 12; tasks: 17)")
    parser.add_argument("--latent", default="32x20", help="steps: latent height x width (pixels / 8)")
    parser.add_argument("--size", default="64x64", help="tasks: height x width in pixels")
    parser.add_argument("--steps", type=int, default=None, help="steps: timed steps after one warm-up (2); tasks: "
                                                                "sampler steps of each task (8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the setups, interleaved")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    args.frames = args.frames or (17 if args.part == "tasks" else 20)
    args.steps = args.steps or (8 if args.part == "tasks" else 2)
    if args.worker:
        return worker(args)
    print(f"torch {torch.__version__}; {cpu_model()}, {os.cpu_count()} CPUs; load average before: {os.getloadavg()}")
    if args.part == "tasks":
        tasks_part(args)
    else:
        steps_part(args)
    print(f"load average after: {os.getloadavg()}")


def steps_part(args):
    windows = context_windows("uniform_v2", args.frames, 12, 4)
    print(f"latent {args.latent}, {args.frames} frames -> windows of {[len(x) for x in windows]}; "
          f"2 ranks get {[[len(windows[i]) for i in m] for m in distributed.assign_windows(windows, 2)]}")
    setups = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
    runs = {label: [] for label in setups}
    for _ in range(args.rounds):  # interleaved, so a change in the machine's load hits every setup alike
        for label, (world, threads) in setups.items():
            runs[label].append(launch(args, world, threads))
    for model in ("tiny", "reduced"):
        print(f"\nUNet {model} ({'32' if model == 'tiny' else '64-256'} channels), seconds per step "
              f"(median of {args.rounds} x {args.steps}):")
        medians = {label: float(np.median([s for r in rs for s in r[model]])) for label, rs in runs.items()}
        for label, s in medians.items():
            print(f"  {label:<24} {s:7.3f} s/step   x{medians['1 process, 1 thread'] / s:.2f} vs 1 process, 1 thread")
    two = runs["2 processes x 1 thread"][-1]
    for key in ("all_reduce", "all_reduce_512x320", "broadcast_full_conditioning"):
        print(f"{key}: {two[key]['bytes'] / 1e6:.2f} MB in {two[key]['seconds'] * 1e3:.2f} ms")
    print(f"conditioning (tiny CLIP towers + reduced-width ReferenceNet) on every rank at once: "
          f"{two['conditioning_every_rank']:.3f} s; on rank 0, then broadcast: {two['conditioning_broadcast']:.3f} s")


if __name__ == "__main__":
    main()

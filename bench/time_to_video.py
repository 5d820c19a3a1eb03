"""Time to video: the README's image2video run at full size, from process start to a written mp4, split
into stages, with the peak memory of each.

    python bench/time_to_video.py [--dir DIR] [--dtypes auto,float32] [--frames 24] [--steps 10] [--delete]

A full-size `musev_referencenet` folder (UNet, ReferenceNet, CLIP text and image towers, IP-Adapter
projection, VAE: 2.5 B weights at seeded random values; speed and memory do not depend on the values) is
written once by `save_pretrained` in bfloat16, as `convert musev --dtype bf16` writes it, into DIR (by
default a folder in the system's temp dir; several GB, so the free space is checked first; `--delete`
removes it at the end). Then, once per dtype, a fresh process runs `python -m musev_lite.run` in-process
on examples/face.png: 512x320, `--frames` new frames after the condition frame, MuseV's Euler sampler at
`--steps` steps, ReferenceNet and IP-Adapter image from the same picture, an mp4 written.

The child times its stages exclusively (a stage's time leaves out the stages it calls) by wrapping the
pipeline's methods, and takes each stage's peak resident set exactly (VmHWM, reset through
/proc/self/clear_refs on every stage change; Linux):
  start         interpreter start, imports, reading and checking the configuration
  load          MuseVPipeline.from_pretrained
  text          the prompt pair through the CLIP text tower
  images        the condition image through the VAE encoder, the IP-Adapter image through the CLIP image
                tower and the projection
  referencenet  the ReferenceNet on the reference image
  denoising     the UNet window calls of every step
  decode        the VAE decoder
  write         encoding and writing the mp4
  other         the rest: the sampler's arithmetic, window sums, checks, bookkeeping
and the parent times the whole process, start to exit. Printed with the host's CPU, its vector and
matrix flags, torch's CPU capability, the dtype `auto` chose, and the load average before and after
each run (the machine is shared: a run's stages are one run, not interleaved medians).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GB = 1e9
STAGES = ("start", "load", "text", "images", "referencenet", "denoising", "decode", "write", "other")


def kib(key: str) -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(key + ":"))


class Stages:
    """Exclusive wall time and peak resident set per stage. `enter(name)` / `leave()` nest: time spent in
    an inner stage is the inner stage's; the peak is reset at every change, so each is that stage's own."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.peak = dict.fromkeys(STAGES, 0)
        self.stack, self.since = ["start"], START

    def _close_current(self) -> None:
        now, current = time.perf_counter(), self.stack[-1]
        self.seconds[current] += now - self.since
        self.peak[current] = max(self.peak[current], kib("VmHWM") * 1024)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.since = now

    def enter(self, name: str) -> None:
        self._close_current()
        self.stack.append(name)

    def leave(self) -> None:
        self._close_current()
        self.stack.pop()

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = owner.__dict__[attribute]
        function = original.__func__ if isinstance(original, classmethod) else original

        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.leave()

        setattr(owner, attribute, classmethod(timed) if isinstance(original, classmethod) else timed)


def child(config: str, result_path: str) -> None:
    """One run of the command line in this process, its stages timed; the result as JSON in `result_path`."""
    stages = Stages()
    import torch

    from musev_lite import run
    from musev_lite.clip import CLIPVisionModelWithProjection
    from musev_lite.ip_adapter import ImageProjection
    from musev_lite.models import MuseVModels
    from musev_lite.outputs import StreamedOutputs
    from musev_lite.pipeline import MuseVPipeline
    from musev_lite.referencenet import ReferenceNet

    stages.wrap(MuseVModels, "from_pretrained", "load")
    stages.wrap(MuseVPipeline, "encode_text", "text")
    stages.wrap(MuseVPipeline, "encode_images", "images")
    stages.wrap(CLIPVisionModelWithProjection, "forward", "images")
    stages.wrap(CLIPVisionModelWithProjection, "penultimate_hidden_states", "images")
    stages.wrap(ImageProjection, "forward", "images")
    stages.wrap(ReferenceNet, "forward", "referencenet")
    stages.wrap(MuseVPipeline, "_unet", "denoising")
    stages.wrap(MuseVPipeline, "decode", "decode")
    stages.wrap(StreamedOutputs, "append", "write")
    stages.wrap(StreamedOutputs, "finish", "write")
    chosen = {}
    resolve_dtype = run.resolve_dtype

    def resolved(name, device):  # the dtype `auto` chose, as the command line resolves it
        chosen["dtype"] = str(resolve_dtype(name, device)).removeprefix("torch.")
        return resolve_dtype(name, device)

    run.resolve_dtype = resolved
    stages.enter("other")  # everything after the imports that no wrapped stage claims
    code = run.main([config])
    stages.leave()
    Path(result_path).write_text(json.dumps({
        "exit": code, "seconds": stages.seconds, "peak": stages.peak, "dtype": chosen.get("dtype"),
        "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability()}))


def host() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"


def loadavg() -> str:
    return " / ".join(open("/proc/loadavg").read().split()[:3])


def gemm_peak(dtype) -> float:
    """GFLOP/s of the best of three 2048^3 torch.mm in `dtype`: the machine's matrix peak, as bench/roofline.py."""
    import torch

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def decode_gflop(height: int, width: int) -> float:
    """FLOPs of the VAE decoder for one frame, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from musev_lite.vae import AutoencoderKL, VAEConfig

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        AutoencoderKL(VAEConfig()).decode(torch.randn(1, 4, height // 8, width // 8))
    return counter.get_total_flops() / 1e9


def write_config(path: Path, weights: Path, out: Path, dtype: str, frames: int, steps: int) -> None:
    path.write_text(f"""
[model]
preset = "musev_referencenet"
weights_dir = "{weights}"
dtype = "{dtype}"
[input]
image = "{REPO / 'examples/face.png'}"
prompt = "(masterpiece, best quality, highres:1), (1girl, solo:1), (eye blinks:1.8), (head wave:1.3)"
[generation]
height = 512
width = 320
num_frames = {frames}
steps = {steps}
seed = 1
[output]
dir = "{out}"
name = "video_{dtype}"
formats = ["mp4"]
overwrite = true
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "musev_lite_load_time")
    parser.add_argument("--dtypes", default="auto,float32", help="model.dtype of each run, in order")
    parser.add_argument("--frames", type=int, default=24, help="new frames after the condition frame")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--delete", action="store_true", help="remove the weights folder at the end")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    sys.path.insert(0, str(BENCH))
    from load_time import make_folder, weights_size

    from musev_lite.denoise import context_windows

    folder = args.dir / "musev_referencenet_bfloat16"  # the folder bench/load_time.py makes, shared
    if not folder.is_dir():
        free = shutil.disk_usage(args.dir.parent if not args.dir.exists() else args.dir).free
        if free < 6 * GB:
            sys.exit(f"{args.dir}: {free / GB:.1f} GB free, the weights folder needs about 6 GB")
        print(f"making {folder} ...", flush=True)
        make_folder(folder, "bfloat16")
    windows = [len(w) for w in context_windows("uniform_v2", args.frames, 12, 4)]
    print(f"host: {host()}\nweights: {folder} ({weights_size(folder) / GB:.2f} GB, bfloat16)\n"
          f"run: image2video 512x320, {args.frames} new frames + the condition frame (windows of {windows} "
          f"new frames per step), {args.steps} Euler steps, mp4", flush=True)
    import torch

    peak = gemm_peak(torch.float32)
    print(f"float32 GEMM peak (best 2048^3 torch.mm): {peak:.0f} GFLOP/s; bfloat16: {gemm_peak(torch.bfloat16):.0f}")
    work = Path(tempfile.mkdtemp(prefix="time_to_video_"))
    try:
        for dtype in args.dtypes.split(","):
            config, result = work / f"{dtype}.toml", work / f"{dtype}.json"
            write_config(config, folder, work, dtype, args.frames, args.steps)
            before = loadavg()
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", str(config), str(result)], check=True, cwd=work,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            r = json.loads(result.read_text())
            mp4 = work / f"video_{dtype}.mp4"
            print(f"\nmodel.dtype = {dtype} -> {r['dtype']} (torch CPU capability {r['capability']}, {r['threads']} "
                  f"threads); exit {r['exit']}; mp4 {mp4.stat().st_size / 1e3:.0f} kB; load average {before} before, "
                  f"{loadavg()} after")
            print("| stage | seconds | share | peak RSS (GB) |\n|---|---|---|---|")
            for stage in STAGES:
                print(f"| {stage} | {r['seconds'][stage]:.1f} | {r['seconds'][stage] / wall:.0%} | {r['peak'][stage] / GB:.2f} |")
            print(f"| process, start to exit | {wall:.1f} | 100% | {max(r['peak'].values()) / GB:.2f} |", flush=True)
            rate = decode_gflop(512, 320) * (args.frames + 1) / r["seconds"]["decode"]
            print(f"decode (VAE in float32): {args.frames + 1} frames, {decode_gflop(512, 320):.0f} GFLOP each, "
                  f"{rate:.0f} GFLOP/s = {rate / peak:.0%} of the float32 GEMM peak ({peak:.0f} GFLOP/s)", flush=True)
    finally:
        shutil.rmtree(work)
        if args.delete:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()

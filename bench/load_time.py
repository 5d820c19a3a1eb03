"""Wall time and peak memory of MuseVPipeline.from_pretrained on a full-size musev_referencenet folder.

    python bench/load_time.py [--dir DIR] [--dtype bfloat16] [--python A --python B] [--rounds 2] [--delete]

The folder (every model at full size, 2.5 B weights, seeded random values, written by save_pretrained in
--dtype; the VAE in float32, as a pipeline keeps it) is made once in DIR, by default a folder in the
system's temp dir, if it is absent: several GB, so the free disk space is checked first; --delete removes
it at the end. Each load runs in a fresh process of each interpreter given (each imports the musev_lite
of its own environment: e.g. an unchanged checkout's venv, then this one's), interleaved A, B, A, B,
after one read of the files so that every load finds them in the page cache. Printed per load: the
wall time of from_pretrained, the peak resident set during the call (VmHWM after a reset through
/proc/self/clear_refs; Linux) as a multiple of the weights' size on disk, and what the call added to
the resident set of the interpreter with torch imported; the load average before each load.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1e9
CHILD = """
import json, sys, time
from pathlib import Path
import torch
import musev_lite
from musev_lite.pipeline import MuseVPipeline

def kib(key):
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(key + ":"))

Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
before = kib("VmRSS")
start = time.perf_counter()
pipe = MuseVPipeline.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak": kib("VmHWM") * 1024, "before": before * 1024,
                  "musev_lite": str(Path(musev_lite.__file__).parent.parent)}))
"""


def make_folder(folder: Path, dtype: str) -> None:
    """save_pretrained of a full-size musev_referencenet pipeline at seeded random weights, each model
    converted to `dtype` as soon as it is made (one model in float32 at a time)."""
    import torch

    from musev_lite.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    from musev_lite.ip_adapter import ImageProjection, ImageProjectionConfig
    from musev_lite.pipeline import MuseVPipeline
    from musev_lite.referencenet import ReferenceNet
    from musev_lite.samplers import SD15_SCHEDULER, SchedulerConfig
    from musev_lite.tokenizer import CLIPTokenizer
    from musev_lite.unet import UNet3D, UNet3DConfig
    from musev_lite.vae import AutoencoderKL, VAEConfig
    from musev_lite.weights import atomic_path

    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    tokenizer = CLIPTokenizer.byte_level()  # no vocabulary file needed; the text encoder's table follows it
    config = UNet3DConfig.preset("musev_referencenet")
    pipe = MuseVPipeline(
        unet=UNet3D(config).to(dtype), vae=AutoencoderKL(VAEConfig()),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size)).to(dtype),
        tokenizer=tokenizer, scheduler=SchedulerConfig.from_dict(SD15_SCHEDULER),
        referencenet=ReferenceNet(config).to(dtype),
        image_proj=ImageProjection(ImageProjectionConfig()).to(dtype),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig()).to(dtype),
    )
    with atomic_path(folder, is_dir=True) as tmp:
        pipe.save_pretrained(tmp)


def weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def read_once(folder: Path) -> None:
    """Read every weights file once, in chunks, so that each load finds it in the page cache."""
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass


def available_memory() -> int:
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def measure(python: str, folder: Path, dtype: str) -> dict:
    # run in the weights folder: `python -c` imports from its working directory first
    out = subprocess.run([python, "-c", CHILD, str(folder), dtype], capture_output=True, text=True, check=True,
                         cwd=folder)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "musev_lite_load_time")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--python", action="append", help="interpreter to load with (repeat; default: this one)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--delete", action="store_true", help="remove the folder at the end")
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir / f"musev_referencenet_{args.dtype}"
    if args.make_only:
        return make_folder(folder, args.dtype)
    if not folder.is_dir():
        need = 2.5e9 * (2 if args.dtype == "bfloat16" else 4) * 1.1
        free = shutil.disk_usage(args.dir.parent if not args.dir.exists() else args.dir).free
        if free < need:
            sys.exit(f"{args.dir}: {free / GB:.1f} GB free, the folder needs about {need / GB:.1f} GB")
        print(f"making {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--dtype", args.dtype, "--make-only"], check=True)
    size = weights_size(folder)
    print(f"{folder}: {size / GB:.2f} GB of weights; from_pretrained(dtype={args.dtype})", flush=True)
    read_once(folder)
    pythons = args.python or [sys.executable]
    results = {python: [] for python in pythons}
    for _ in range(args.rounds):
        for python in pythons:
            if available_memory() < 2 * size:
                sys.exit(f"only {available_memory() / GB:.1f} GB of memory available; a load may need {2 * size / GB:.1f}")
            load = open("/proc/loadavg").read().split()[:3]
            r = measure(python, folder, args.dtype)
            results[python].append(r)
            print(f"{r['musev_lite']}: {r['seconds']:.1f} s, peak RSS {r['peak'] / GB:.2f} GB = {r['peak'] / size:.2f} x "
                  f"the weights on disk (+{(r['peak'] - r['before']) / GB:.2f} GB over the {r['before'] / GB:.2f} GB "
                  f"before the call); load average {' / '.join(load)}", flush=True)
    for python, runs in results.items():
        print(f"{runs[0]['musev_lite']}: median {statistics.median(r['seconds'] for r in runs):.1f} s, "
              f"peak RSS median {statistics.median(r['peak'] for r in runs) / GB:.2f} GB")
    if args.delete:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()

"""Command line: `python -m musev_lite.run config.toml [--set section.key=value ...]`.

Reads and checks the configuration, loads the models, generates with progress on stderr, writes the
outputs (atomically) and prints their paths. Any mistake in the configuration, inputs or weights is
one line on stderr starting with "error:" and exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import __version__, distributed
from .config import ConfigError, RunConfig, load_config, to_toml
from .pipeline import MuseVPipeline, Progress
from .video_io import contact_sheet, read_image, write_animation, write_image, write_json, write_mp4, write_png_frames
from .weights import missing_weights

DEMO_NOTE = ("note: preset 'tiny' runs seeded random weights: a pipeline demo, not a trained model, so its frames "
             "are noise. Set preset = \"musev_referencenet\" and a converted weights_dir for real videos.")


def check_inputs(config: RunConfig) -> dict:
    """Open every input image now, so a bad path fails before any model is loaded."""
    images = {}
    for key in ("image", "refer_image", "ip_adapter_image"):
        path = getattr(config.input, key)
        if path:
            try:
                images[key] = read_image(path)
            except ValueError as err:
                raise ConfigError(f"input.{key}: {err}") from None
    return images


def check_output_dir(config: RunConfig) -> Path:
    out = Path(config.output.dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ConfigError(f"output.dir {str(out)!r} is not writable ({err.strerror}); choose another folder") from None
    return out


def resolve_device(name: str) -> str:
    """`model.device` checked against what this torch has; "auto" picks cuda, then mps, then cpu."""
    has = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return next(kind for kind in ("cuda", "mps", "cpu") if has[kind])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device = {name!r} is not a torch device; use \"auto\", \"cpu\", \"cuda\", "
                          "\"cuda:1\" or \"mps\"") from None
    if not has.get(device.type, False):
        raise ConfigError(f"model.device = {name!r} but this torch has no {device.type.upper()} device; "
                          f"use \"auto\" or one of {', '.join(k for k, ok in has.items() if ok)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"model.device = {name!r} but there are {torch.cuda.device_count()} CUDA devices")
    return name


def load_pipeline(config: RunConfig) -> MuseVPipeline:
    m = config.model
    device, dtype = distributed.rank_device(resolve_device(m.device)), getattr(torch, m.dtype)
    if m.preset == "tiny":
        if distributed.is_main():
            print(DEMO_NOTE, file=sys.stderr)
        pipe = MuseVPipeline.demo(seed=0, device=device).to(dtype=dtype)
    else:
        missing = missing_weights(m.weights_dir)
        if missing:
            raise ConfigError(
                f"model.weights_dir {m.weights_dir!r} lacks {', '.join(missing)}; fetch and convert them with: "
                f"python -m musev_lite.fetch {m.preset} --dest {m.weights_dir}   (see weights/README.md)")
        pipe = MuseVPipeline.from_pretrained(m.weights_dir, device=device, dtype=dtype)
        folder_has_referencenet = pipe.referencenet is not None
        if folder_has_referencenet != (m.preset != "musev"):
            holds = "a referencenet model" if folder_has_referencenet else "the musev model (no ReferenceNet)"
            raise ConfigError(f"model.preset = {m.preset!r} but model.weights_dir {m.weights_dir!r} holds {holds}; "
                              "set the preset that matches the folder, or point weights_dir at the right folder")
    if m.lora:
        pipe.load_loras([(entry.path, entry.scale) for entry in m.lora])
    if m.compile:
        pipe.unet = torch.compile(pipe.unet)
    return pipe


class ProgressPrinter:
    """One line per step on stderr: stage, shot, step, elapsed and estimated time left."""

    def __init__(self, total_steps: int):
        self.total, self.done, self.start = total_steps, 0, time.monotonic()

    def __call__(self, p: Progress) -> None:
        elapsed = time.monotonic() - self.start
        if p.stage == "decode":
            print(f"decode  {p.step}/{p.steps} frames  {elapsed:.0f}s", file=sys.stderr, flush=True)
            return
        self.done += 1
        eta = elapsed / self.done * (self.total - self.done)
        where = "first frame" if p.stage == "first_frame" else f"shot {p.shot + 1}/{p.shots}"
        print(f"{where}  step {p.step}/{p.steps}  ({p.unet_calls} UNet call{'s' * (p.unet_calls != 1)}/step)  "
              f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left", file=sys.stderr, flush=True)


def write_outputs(config: RunConfig, out: Path, stem: str, frames, sidecar: dict) -> list[Path]:
    o = config.output
    written = []
    for fmt in o.formats:
        if fmt == "mp4":
            path = out / f"{stem}.mp4"
            write_mp4(path, [frames], o.fps)
        elif fmt == "png":
            path = out / f"{stem}_frames"
            write_png_frames(path, [frames])
        else:
            from PIL import Image

            path = out / f"{stem}.{fmt}"
            write_animation(path, [Image.fromarray(f) for f in frames], o.fps)
        written.append(path)
    if o.contact_sheet:
        written.append(out / f"{stem}_sheet.png")
        write_image(written[-1], contact_sheet(frames))
    written.append(out / f"{stem}.json")
    write_json(written[-1], dict(sidecar, outputs=[p.name for p in written[:-1]]))
    return written


def run(config_path: str, overrides: list[str]) -> list[Path]:
    config = load_config(config_path, overrides)
    images = check_inputs(config)
    out = check_output_dir(config)
    try:  # under torchrun: join the other ranks; they share the work (distributed.py)
        distributed.init(distributed.rank_device(resolve_device(config.model.device)))
        return generate(config, config_path, images, out)
    finally:
        distributed.shutdown()


def generate(config: RunConfig, config_path: str, images: dict, out: Path) -> list[Path]:
    pipe = load_pipeline(config)
    g, i = config.generation, config.input
    seed = g.seed if g.seed is not None else random.randrange(10**8)  # distributed: the pipeline takes rank 0's
    drawn = "image" not in images
    total = g.n_batch * g.steps + (g.first_frame_steps if drawn or g.redraw_condition_image else 0)
    started = time.monotonic()
    result = pipe(
        i.prompt, images.get("image"), g.replace(seed=seed), negative_prompt=i.negative_prompt,
        refer_image=images.get("refer_image"), ip_adapter_image=images.get("ip_adapter_image"),
        callback=ProgressPrinter(total) if distributed.is_main() else None,
    )
    if not distributed.is_main():  # distributed: rank 0 writes
        return []
    seed = result.seed
    stem = config.output.name or f"{Path(config_path).stem}-{seed}"
    sidecar = {
        "musev_lite_version": __version__,
        "config": config.as_dict(),
        "seed": seed,
        "frames": int(result.frames.shape[0]),
        "height": int(result.frames.shape[1]),
        "width": int(result.frames.shape[2]),
        "fps": config.output.fps,
        "model_files": {Path(f).name: os.path.getsize(f) for f in pipe.files},
        "demo_weights": config.model.preset == "tiny",
        "seconds": round(time.monotonic() - started, 2),
    }
    return write_outputs(config, out, stem, result.frames, sidecar)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m musev_lite.run",
                                     description="Generate a video with MuseV's parallel denoising.")
    parser.add_argument("config", help="a TOML file (see examples/ and the README's Configuration section)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, e.g. --set generation.seed=3 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (defaults filled in) as TOML and exit")
    parser.add_argument("--version", action="version", version=f"musev_lite {__version__}")
    args = parser.parse_args(argv)
    warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}", file=sys.stderr)
    try:
        if args.print_config:
            print(to_toml(load_config(args.config, args.set)), end="")
            return 0
        paths = run(args.config, args.set)
    except ValueError as err:  # ConfigError, MediaError, WeightsError, PromptError, ...: the user's to fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    except distributed.RankLostError as err:  # under torchrun: another rank died or hung
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

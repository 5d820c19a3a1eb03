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

import numpy as np
import torch

from . import __version__
from .config import ConfigError, RunConfig, load_config, to_toml
from .pipeline import ControlVideo, MuseVPipeline, Progress
from .pose import draw_pose, read_keypoints
from .video_io import (
    VideoFrames,
    contact_sheet,
    read_image,
    read_video,
    write_animation,
    write_image,
    write_json,
    write_mp4,
    write_png_frames,
)
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


def read_videos(config: RunConfig) -> tuple[VideoFrames | None, list]:
    """video2video inputs, read now so a bad file fails before any model is loaded: the RGB video and
    every control (a video as VideoFrames, keypoint JSON as its PoseFrames), sampled alike."""
    i = config.input
    fps, sample_rate = i.video_fps or None, None if i.video_fps else i.video_sample_rate

    def read(path, where):
        try:
            return read_video(path, fps=fps, sample_rate=sample_rate)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None

    video = read(i.video, "input.video") if i.video else None
    controls = []
    for n, c in enumerate(i.control):
        where = f"input.control[{n}]"
        if Path(c.path).is_dir() or c.path.endswith(".json"):
            if i.video_fps:
                raise ConfigError(f"{where}: keypoint JSON has no frame rate, so input.video_fps cannot apply; "
                                  "use input.video_sample_rate")
            try:
                poses = read_keypoints(c.path, tuple(c.pose_canvas) or None)[::i.video_sample_rate]
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None
            controls.append(poses)
        else:
            controls.append(read(c.path, where))
    lengths = {name: len(source.frames) if isinstance(source, VideoFrames) else len(source)
               for name, source in [("input.video", video)] + [(f"input.control[{n}]", c) for n, c in enumerate(controls)]
               if source is not None}
    for name, length in lengths.items():
        if length < 2:
            raise ConfigError(f"{name} gives {length} frame(s); video2video needs at least 2 (frame 0 pairs with the "
                              "condition image, the others are generated)")
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"the videos give different numbers of frames ({', '.join(f'{k}: {v}' for k, v in lengths.items())}); "
                          "use videos of the same length and frame rate")
    return video, controls


def control_videos(config: RunConfig, controls: list, height: int, width: int) -> list[ControlVideo]:
    """The controls as the pipeline takes them; keypoints are drawn at the video size."""
    out = []
    for c, source in zip(config.input.control, controls):
        if isinstance(source, VideoFrames):
            out.append(ControlVideo(source.frames, c.controlnet, c.scale))
        else:
            frames = np.stack([draw_pose(frame, height, width) for frame in source])
            out.append(ControlVideo(frames, c.controlnet, c.scale, at_video_size=True))
    return out


def describe_video2video(video: VideoFrames | None, controls: list, config: RunConfig) -> str:
    """What video2video will do, for stderr: which frames were read and how many are generated."""
    lengths = [len(video.frames)] if video is not None else []
    lengths += [len(c.frames) if isinstance(c, VideoFrames) else len(c) for c in controls]
    parts = []
    for name, source in [("input.video", video)] + [(f"input.control[{n}]", c) for n, c in enumerate(controls)]:
        if isinstance(source, VideoFrames):
            parts.append(f"{name}: {len(source.frames)} of {source.source_frames} frames "
                         f"({source.source_fps or 0:.4g} fps -> {source.fps or 0:.4g} fps)")
        elif source is not None:
            parts.append(f"{name}: {len(source)} keypoint frames")
    return (f"video2video: {'; '.join(parts)}; frame 0 pairs with the condition image, the other "
            f"{min(lengths) - 1} frames are generated in one parallel-denoising pass")


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
    device, dtype = resolve_device(m.device), getattr(torch, m.dtype)
    if m.preset == "tiny":
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
    video, controls = read_videos(config)
    out = check_output_dir(config)
    pipe = load_pipeline(config)
    g, i = config.generation, config.input
    seed = g.seed if g.seed is not None else random.randrange(10**8)
    video2video = video is not None or bool(controls)
    drawn = "image" not in images and video is None
    total = (1 if video2video else g.n_batch) * g.steps + (g.first_frame_steps if drawn or g.redraw_condition_image else 0)
    extra = {}
    if video2video:
        print(describe_video2video(video, controls, config), file=sys.stderr)
        first = images.get("image", video.frames[0] if video is not None else None)
        height, width = pipe.video_size(first, None, g)
        extra = dict(video=None if video is None else video.frames,
                     control=control_videos(config, controls, height, width))
    started = time.monotonic()
    result = pipe(
        i.prompt, images.get("image"), g.replace(seed=seed), negative_prompt=i.negative_prompt,
        refer_image=images.get("refer_image"), ip_adapter_image=images.get("ip_adapter_image"),
        callback=ProgressPrinter(total), **extra,
    )
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
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

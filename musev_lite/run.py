"""Command line: `python -m musev_lite.run config.toml [--set section.key=value ...]`.

Reads and checks the configuration, loads the models, generates with progress on stderr, writes the
outputs and prints their paths. Any mistake in the configuration, inputs or weights is one line on
stderr starting with "error:" and exit code 2; nothing is written then. The outputs appear together
or not at all (`video_io.OutputSet`): SIGINT (Ctrl-C) and SIGTERM stop the run with exit code 130 /
143, leave no temporary file, and say what was (not) written.
"""

from __future__ import annotations

import os
import signal
import sys


def exit_while_starting(signum, frame):
    """Until main() takes over the signals: nothing to clean up yet, so one line and out."""
    print(f"interrupted ({signal.Signals(signum).name}) while starting: nothing was written", file=sys.stderr)
    os._exit(128 + signum)


if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    signal.signal(signal.SIGINT, exit_while_starting)
    signal.signal(signal.SIGTERM, exit_while_starting)

import argparse  # noqa: E402 (after the handlers above, on purpose)
import hashlib  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from . import __version__, distributed  # noqa: E402
from .checkpoint import Checkpoint  # noqa: E402
from .config import ConfigError, OutputConfig, RunConfig, load_config, to_toml  # noqa: E402
from .pipeline import ControlVideo, MuseVPipeline, Progress, resolve_device, resolve_dtype  # noqa: E402
from .pose import draw_pose, read_keypoints  # noqa: E402
from .video_io import (  # noqa: E402
    Mp4Writer,
    OutputSet,
    VideoFrames,
    contact_sheet,
    read_image,
    read_video,
    sheet_picks,
    signals_held,
    write_animation,
    write_image,
    write_json,
)
from .weights import missing_weights  # noqa: E402

DEMO_NOTE = ("note: preset 'tiny' runs seeded random weights: a pipeline demo, not a trained model, so its frames "
             "are noise. Set preset = \"musev_referencenet\" and a converted weights_dir for real videos.")


def check_inputs(config: RunConfig) -> dict:
    """Open every input image now (and see that every LoRA file is there), so a bad path fails before
    any model is loaded or any output folder made."""
    for n, entry in enumerate(config.model.lora):
        if not Path(entry.path).is_file():
            raise ConfigError(f"model.lora[{n}].path: {entry.path}: no such file{config.path_note(f'model.lora[{n}].path')}")
    images = {}
    for key in ("image", "refer_image", "ip_adapter_image"):
        path = getattr(config.input, key)
        if path:
            try:
                images[key] = read_image(path)
            except ValueError as err:
                raise ConfigError(f"input.{key}: {err}{config.path_note(f'input.{key}')}") from None
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
        raise ConfigError(f"output.dir {str(out)!r} is not writable ({err.strerror}); choose another folder"
                          f"{config.path_note('output.dir')}") from None
    return out


def load_pipeline(config: RunConfig) -> MuseVPipeline:
    m = config.model
    device = distributed.rank_device(resolve_device(m.device, "model.device"))
    dtype = resolve_dtype(m.dtype, device)
    if m.dtype == "auto" and distributed.is_main():
        why = "this device computes it in hardware" if dtype == torch.bfloat16 else "this device has no bfloat16 hardware"
        print(f"dtype: {str(dtype).removeprefix('torch.')} (model.dtype = \"auto\": {why}; set \"float32\" to "
              "reproduce the original MuseV to rounding)", file=sys.stderr)
    if m.preset == "tiny":
        if distributed.is_main():
            print(DEMO_NOTE, file=sys.stderr)
        pipe = MuseVPipeline.demo(seed=0, device=device).to(dtype=dtype)
    else:
        missing = missing_weights(m.weights_dir)
        if missing:
            raise ConfigError(
                f"model.weights_dir {m.weights_dir!r} lacks {', '.join(missing)}{config.path_note('model.weights_dir')}; "
                f"fetch and convert them with: python -m musev_lite.fetch {m.preset} --dest {m.weights_dir}   "
                "(see weights/README.md)")
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


def output_kinds(o: OutputConfig, stem: str) -> dict[str, str]:
    """File name -> what it holds (a format, "sheet" or "json"), in the order written, the sidecar last."""
    kinds = {f"{stem}_frames" if fmt == "png" else f"{stem}.{fmt}": fmt for fmt in o.formats}
    if o.contact_sheet:
        kinds[f"{stem}_sheet.png"] = "sheet"
    kinds[f"{stem}.json"] = "json"
    return kinds


class StreamedOutputs:
    """The run's outputs, written as its shots come: the mp4 through an encoder that stays open, PNG frames
    a file at a time, the contact sheet's frames picked as they pass, so memory does not grow with the
    video's length. GIF and WebP are written at the end from frames kept in memory (Pillow writes an
    animation at once): they are for short clips. Everything goes under `outputs`' temporary names."""

    def __init__(self, config: RunConfig, outputs: OutputSet, total_frames: int):
        self.o, self.outputs, self.kinds = config.output, outputs, output_kinds(config.output, outputs.stem)
        self.frames, self.size = 0, (0, 0)
        self.picks = set(sheet_picks(total_frames)) if self.o.contact_sheet else set()
        self.sheet, self.animation = [], []
        self.mp4 = self.png = None
        for name, kind in self.kinds.items():
            if kind == "mp4":
                self.mp4_name, self.mp4 = name, Mp4Writer(outputs.path(name), self.o.fps)
            elif kind == "png":
                self.png_name, self.png = name, outputs.path(name)
                self.png.mkdir()

    def __enter__(self) -> StreamedOutputs:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.mp4 is not None:
            self.mp4.abort()  # the staging folder goes with it

    def append(self, frames: np.ndarray) -> None:
        """Write a shot's frames (n, H, W, 3) to every streamed output."""
        if self.mp4 is not None:
            self.mp4.write(frames)
        for n, frame in enumerate(frames, start=self.frames):
            if self.png is not None:
                Image.fromarray(frame).save(self.png / f"{n:05d}.png")
            if n in self.picks:
                self.sheet.append(frame)
        if {"gif", "webp"} & set(self.kinds.values()):
            self.animation += [Image.fromarray(f) for f in frames]
        self.frames, self.size = self.frames + len(frames), frames.shape[1:3]

    def finish(self, sidecar: dict) -> None:
        """Finish the mp4, write the outputs that need every frame and the sidecar (last)."""
        if self.mp4 is not None:
            print(f"finishing {self.mp4_name}", file=sys.stderr, flush=True)
            self.mp4, mp4 = None, self.mp4
            mp4.close()
        for name, kind in self.kinds.items():
            path = self.outputs.path(name)
            if kind in ("gif", "webp"):
                print(f"writing {name}", file=sys.stderr, flush=True)
                write_animation(path, self.animation, self.o.fps)
            elif kind == "sheet":
                write_image(path, contact_sheet(np.stack(self.sheet)))
            elif kind == "json":
                write_json(path, dict(sidecar, outputs=self.outputs.names[:-1]))

    def keep_partial(self) -> list[Path]:
        """On an interrupt: the finished shots' mp4 (finished now, so it plays) and PNG frames, under names
        that say so (NAME.partial.mp4, NAME_frames.partial), replacing older ones; the paths kept."""
        kept = []
        if self.frames == 0:
            return kept
        if self.mp4 is not None:
            self.mp4, mp4 = None, self.mp4
            mp4.close()
            kept.append(self.outputs.folder / partial_name(self.mp4_name))
            os.replace(self.outputs.path(self.mp4_name), kept[-1])
        if self.png is not None:
            kept.append(self.outputs.folder / partial_name(self.png_name))
            shutil.rmtree(kept[-1], ignore_errors=True)
            os.replace(self.png, kept[-1])
        return kept


def partial_name(name: str) -> str:
    """v.mp4 -> v.partial.mp4, v_frames -> v_frames.partial: the finished shots of an interrupted run."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.partial.{suffix}" if dot else f"{name}.partial"


def refuse_existing(config: RunConfig, outputs: OutputSet) -> None:
    """Say what entering `outputs` cleaned up; refuse outputs of the same name unless output.overwrite."""
    for note in outputs.notes:
        print(f"note: {note}", file=sys.stderr)
    existing = outputs.existing()
    if existing and not config.output.overwrite:
        more = f" (and {len(existing) - 1} more of this run's outputs)" if len(existing) > 1 else ""
        raise ConfigError(f"{existing[0]} already exists{more}; set output.overwrite = true to replace it, "
                          "or choose another output.name or output.dir")


def size_note(image, height: int, width: int, config: RunConfig) -> str:
    """Where the video's size comes from, for stderr."""
    g = config.generation
    if g.height and g.width:
        return f"size: {width}x{height} (generation.width x height)"
    choose = "set generation.height/width to choose"
    if image is None:
        return f"size: {width}x{height}, MuseV's default without an image ({choose})"
    return f"size: {width}x{height} from the image's {image.width}x{image.height} ({choose})"


def run(config_path: str, overrides: list[str], resume: bool = False) -> list[Path]:
    """Generate and write; return the paths written. An interrupt (KeyboardInterrupt, or Interrupted for
    SIGTERM) leaves with this run's OutputSet as its `outputs` attribute and what it kept for a resume as
    `kept`, for main's report. `resume`: continue the interrupted run whose checkpoint has this name."""
    config = load_config(config_path, overrides)
    images = check_inputs(config)
    video, controls = read_videos(config)
    out = check_output_dir(config)
    try:  # under torchrun: join the other ranks; they share the work (distributed.py), rank 0 writes
        distributed.init(distributed.rank_device(resolve_device(config.model.device, "model.device")))
        if (config.output.checkpoint or resume) and distributed.current() is not None:
            raise ConfigError("output.checkpoint and --resume work in one process, not under torchrun yet; "
                              "run with python -m musev_lite.run, or set output.checkpoint = false")
        seed = config.generation.seed
        if seed is None:
            seed = checkpoint_seed(out, Path(config_path).stem) if resume and not config.output.name else random.randrange(10**8)
        if not distributed.is_main():
            for _ in generate(load_pipeline(config), config, images, seed, video, controls):
                pass
            return []
        stem = config.output.name or f"{Path(config_path).stem}-{seed}"
        outputs = OutputSet(out, stem, list(output_kinds(config.output, stem)))
        checkpoint = None
        try:
            with outputs:  # the name locked; whatever happens, this run's temporaries go and the lock with them
                refuse_existing(config, outputs)
                checkpoint = open_checkpoint(config, outputs, seed, resume)
                return write_run(config, outputs, checkpoint, images, seed, video, controls)
        except KeyboardInterrupt as stop:
            stop.outputs = outputs
            if checkpoint is not None and checkpoint.saved is not None:
                stop.kept = getattr(stop, "kept", []) + [checkpoint.folder]
                stop.resume = resume_command(config_path, overrides, config, seed)
            raise
    finally:
        distributed.shutdown()


def checkpoint_seed(folder: Path, config_stem: str) -> int:
    """The seed of the one checkpoint `<config name>-<seed>.checkpoint` in `folder` (a resumed run whose
    seed was drawn)."""
    name = re.compile(rf"{re.escape(config_stem)}-(\d+)\.checkpoint")
    seeds = sorted(int(m[1]) for p in folder.iterdir() if (m := name.fullmatch(p.name)))
    if len(seeds) != 1:
        found = f"{len(seeds)} ({', '.join(f'{config_stem}-{s}.checkpoint' for s in seeds)})" if seeds else "none"
        raise ConfigError(f"--resume without generation.seed looks for one checkpoint {config_stem}-<seed>.checkpoint in "
                          f"{folder} and found {found}; say which with --set generation.seed=<seed>")
    return seeds[0]


def fingerprint(config: RunConfig, seed: int) -> dict:
    """What decides the video, for a checkpoint: every setting but the output's and the device (the
    dtype as resolved), the seed, and the content of every input file (sha256)."""
    settings = config.as_dict()
    del settings["output"]
    settings["model"] = {k: v for k, v in settings["model"].items() if k not in ("device", "compile")}
    device = resolve_device(config.model.device, "model.device")
    settings["model"]["dtype"] = str(resolve_dtype(config.model.dtype, device)).removeprefix("torch.")  # "auto" resolved
    settings["generation"]["seed"] = seed
    i = config.input
    paths = {f"input.{key}": getattr(i, key) for key in ("image", "refer_image", "ip_adapter_image", "video")}
    paths.update({f"input.control[{n}]": c.path for n, c in enumerate(i.control)})
    paths.update({f"model.lora[{n}]": entry.path for n, entry in enumerate(config.model.lora)})
    settings["files"] = {key: file_digest(path) for key, path in paths.items() if path}
    return settings


def file_digest(path: str) -> str:
    """sha256 of a file, or of a folder's files (keypoint JSON folders), in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def open_checkpoint(config: RunConfig, outputs: OutputSet, seed: int, resume: bool) -> Checkpoint | None:
    """The run's checkpoint folder (NAME.checkpoint) with `output.checkpoint` or `resume`, loaded for a
    resume. A checkpoint left by an interrupted run of this name is not overwritten unless output.overwrite
    (then it and the partial outputs go)."""
    folder = outputs.folder / f"{outputs.stem}.checkpoint"
    checkpoint = Checkpoint(folder, fingerprint(config, seed), config.output.checkpoint_every)
    if resume:
        checkpoint.load()
        return checkpoint
    if folder.exists():
        if not config.output.overwrite:
            raise ConfigError(f"{folder} holds an interrupted run of this name: continue it with --resume, or set "
                              "output.overwrite = true to start over (it is deleted)")
        checkpoint.remove()
    remove_partials(config, outputs)
    return checkpoint if config.output.checkpoint else None


def remove_partials(config: RunConfig, outputs: OutputSet) -> None:
    """The partial outputs an interrupted run of this name kept (NAME.partial.mp4, NAME_frames.partial)."""
    for name in output_kinds(config.output, outputs.stem):
        path = outputs.folder / partial_name(name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def resume_command(config_path: str, overrides: list[str], config: RunConfig, seed: int) -> str:
    """The command that continues this run (the drawn seed added when the config leaves it unset)."""
    args = [config_path] + [a for o in overrides for a in ("--set", o)]
    if config.generation.seed is None:
        args += ["--set", f"generation.seed={seed}"]
    return "python -m musev_lite.run " + " ".join(shlex.quote(a) for a in args + ["--resume"])


def video_length(config: RunConfig, images: dict, video: VideoFrames | None, controls: list) -> int:
    """Frames of the video this run writes."""
    if video is not None or controls:
        return len(video.frames) if video is not None else len(controls[0].frames if isinstance(controls[0], VideoFrames)
                                                               else controls[0])
    g = config.generation
    return g.n_batch * g.num_frames + ("image" in images)


def write_run(config: RunConfig, outputs: OutputSet, checkpoint: Checkpoint | None, images: dict, seed: int,
              video: VideoFrames | None, controls: list) -> list[Path]:
    """Load the models, generate shot by shot into the streamed outputs, publish them; with a checkpoint,
    save it as the run goes, keep it and the finished shots on an interrupt, remove it at the end."""
    pipe = load_pipeline(config)
    started = time.monotonic()
    with StreamedOutputs(config, outputs, video_length(config, images, video, controls)) as streams:
        try:
            for frames in generate(pipe, config, images, seed, video, controls, checkpoint):
                streams.append(frames)
        except KeyboardInterrupt as stop:
            if checkpoint is not None:
                with signals_held():  # a second Ctrl-C waits until the state and the partial outputs are kept
                    checkpoint.save_latest()
                    stop.kept = streams.keep_partial() if checkpoint.saved is not None else []
            raise
        streams.finish({
            "musev_lite_version": __version__,
            "config": config.as_dict(),
            "seed": seed,
            "frames": streams.frames,
            "height": int(streams.size[0]),
            "width": int(streams.size[1]),
            "fps": config.output.fps,
            "dtype": str(pipe.dtype).removeprefix("torch."),  # what model.dtype resolved to
            "model_files": {Path(f).name: os.path.getsize(f) for f in pipe.files},
            "demo_weights": config.model.preset == "tiny",
            "seconds": round(time.monotonic() - started, 2),
        })
    paths = outputs.publish()
    if checkpoint is not None:
        with signals_held():
            checkpoint.remove()
            remove_partials(config, outputs)
    return paths


def generate(pipe: MuseVPipeline, config: RunConfig, images: dict, seed: int, video: VideoFrames | None,
             controls: list, checkpoint: Checkpoint | None = None) -> Iterator[np.ndarray]:
    """Each shot's frames as it is done, with progress on stderr (rank 0's). A resumed run (a checkpoint
    with a loaded state) first decodes the shots the checkpoint holds, then continues from its state."""
    g, i = config.generation, config.input
    main_rank = distributed.is_main()
    video2video = video is not None or bool(controls)
    first = images.get("image", Image.fromarray(video.frames[0]) if video is not None else None)
    height, width = pipe.video_size(first, None, g)
    if main_rank:
        print(size_note(first, height, width, config), file=sys.stderr)
    shots = 1 if video2video else g.n_batch
    steps = shots * g.steps + (g.first_frame_steps if first is None or g.redraw_condition_image else 0)
    extra = {}
    if video2video:
        if main_rank:
            print(describe_video2video(video, controls, config), file=sys.stderr)
        extra = dict(video=None if video is None else video.frames,
                     control=control_videos(config, controls, height, width))
    resume = checkpoint.saved if checkpoint is not None else None
    if resume is not None:
        steps = (shots - resume.shot) * g.steps - resume.step
        where = f"shot {resume.shot + 1}/{shots} at step {resume.step}/{g.steps}" if resume.shot < shots else "all shots"
        print(f"resuming {checkpoint.folder.name}: {resume.shot} of {shots} shots done, {where}; "
              f"decoding the {resume.shot} done", file=sys.stderr, flush=True)
        for _, latents in checkpoint.finished_shots(resume.shot):
            yield pipe.decode(latents.to(pipe.device))
    result = pipe.generate(
        i.prompt, images.get("image"), g.replace(seed=seed), negative_prompt=i.negative_prompt,
        refer_image=images.get("refer_image"), ip_adapter_image=images.get("ip_adapter_image"),
        callback=ProgressPrinter(steps) if main_rank else None, resume=resume,
        on_state=None if checkpoint is None else checkpoint.on_state, **extra,
    )
    for shot in result:
        if checkpoint is not None:
            checkpoint.save_shot(shot.index, shot.latents)
        yield shot.frames


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C, so every `with` and `finally` on the way cleans up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_interrupt():
    """While the block runs, SIGINT and SIGTERM raise Interrupted (signals reach only the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupt_report(stop: KeyboardInterrupt) -> str:
    """What an interrupted run did and did not write, in one line."""
    name = signal.Signals(getattr(stop, "signum", signal.SIGINT)).name
    outputs: OutputSet | None = getattr(stop, "outputs", None)
    if outputs is None:
        return f"interrupted ({name}) while starting: nothing was written"
    if outputs.published:
        return f"interrupted ({name}) after the outputs were complete: wrote {', '.join(outputs.names)} in {outputs.folder}"
    existing = "; the existing outputs of that name are unchanged" if outputs.existing() else ""
    if getattr(stop, "resume", None):
        kept = ", ".join(path.name for path in stop.kept)
        return (f"interrupted ({name}): {', '.join(outputs.names)} were not written; kept {kept} in {outputs.folder}"
                f"{existing}; continue with: {stop.resume}")
    return (f"interrupted ({name}): nothing was written ({', '.join(outputs.names)} in {outputs.folder} were not) "
            f"and no temporary file is left{existing}")


def out_of_memory(err: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m musev_lite.run",
                                     description="Generate a video with MuseV's parallel denoising.")
    parser.add_argument("config", help="a TOML file (see examples/ and the README's Configuration section)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, e.g. --set generation.seed=3 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run of this configuration from its checkpoint "
                             "(output.checkpoint = true saves one); the same config and --set options")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (defaults filled in) as TOML and exit")
    parser.add_argument("--version", action="version", version=f"musev_lite {__version__}")
    args = parser.parse_args(argv)
    warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}", file=sys.stderr)
    try:
        with signals_interrupt():
            if args.print_config:
                print(to_toml(load_config(args.config, args.set)), end="")
                return 0
            paths = run(args.config, args.set, args.resume)
    except ValueError as err:  # ConfigError, MediaError, WeightsError, PromptError, ...: the user's to fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    except distributed.RankLostError as err:  # under torchrun: another rank died or hung
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # Ctrl-C, or Interrupted (SIGINT, SIGTERM)
        print(interrupt_report(stop), file=sys.stderr)
        for path in getattr(getattr(stop, "outputs", None), "published", []):
            print(path)
        return 128 + getattr(stop, "signum", signal.SIGINT)
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        print(f"error: out of memory ({str(err).splitlines()[0][:200]}); nothing was written. Lower "
              "generation.height/width, num_frames, n_batch or window_batch, or free memory", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `python -m musev_lite.run config.toml [--set section.key=value ...]`.

Reads and checks the configuration, loads the models, generates with progress on stderr, writes the
outputs and prints their paths. Any mistake in the configuration, inputs or weights is one line on
stderr starting with "error:" and exit code 2; nothing is written then. The outputs appear together
or not at all (`outputs.OutputSet`): SIGINT (Ctrl-C) and SIGTERM stop the run with exit code 130 /
143, leave no temporary file, and say what was (not) written (`outputs.RunInterrupted`).

This file parses the command line, plans the run (a `Job`: the settings, the inputs `inputs.py` read,
the seed, the device and dtype), runs it (rank 0 writes through `outputs.py` and, asked to, keeps a
`checkpoint.py` checkpoint) and reports how it ended (`main`).
"""

from __future__ import annotations

import os
import signal
import sys


def exit_while_starting(signum, frame):
    """Until main() takes over the signals: nothing to clean up yet, so one line (under torchrun, from the
    first rank of each node, as `distributed.reports`) and out."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1") or os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"interrupted ({signal.Signals(signum).name}) while starting: nothing was written", file=sys.stderr)
    os._exit(128 + signum)


if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    signal.signal(signal.SIGINT, exit_while_starting)
    signal.signal(signal.SIGTERM, exit_while_starting)

import argparse  # noqa: E402 (after the handlers above, on purpose)
import random  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from . import __version__, distributed  # noqa: E402
from .checkpoint import Checkpoint, checkpoint_seed, open_checkpoint, resume_command, resumed_state  # noqa: E402
from .command import exit_code  # noqa: E402
from .config import RunConfig, load_config, output_kinds  # noqa: E402
from .inputs import (RunInputs, control_videos, describe_video2video, load_pipeline, read_inputs, size_note,  # noqa: E402
                     with_video_motion_speed)
from .limits import DiskFullError  # noqa: E402
from .memory import out_of_memory  # noqa: E402
from .outputs import (OutputSet, RunInterrupted, StreamedOutputs, check_output_dir, make_output_dir,  # noqa: E402
                      refuse_existing, signals_interrupt)
from .device import resolve_device, resolve_dtype  # noqa: E402
from .pipeline import MuseVPipeline, Progress  # noqa: E402
from .plan import ControlVideo, GenerationPlan, video_size  # noqa: E402
from .settings import ConfigError  # noqa: E402
from .tasks import RUNNING_TASK, Task, load_tasks, resolved_toml, run_all  # noqa: E402


@dataclass(frozen=True)
class Job:
    """A run as planned, before any model is loaded: the settings and the command line they came from (for
    the resume command), the inputs as read, the seed, and where it computes: the device (under torchrun,
    this rank's GPU) and the models' dtype, resolved once from model.device and model.dtype."""

    config: RunConfig
    config_path: str
    overrides: list[str]
    resume: bool  # continue the interrupted run whose checkpoint has this name
    inputs: RunInputs
    seed: int
    device: str
    dtype: torch.dtype
    name: str = ""  # the outputs are <name>-<seed> without output.name: a task's name; "": the config file's

    def resume_command(self) -> str:
        """The command that continues this run (`checkpoint.resume_command`; a task finds its drawn seed)."""
        return resume_command(self.config_path, self.overrides, self.config, None if self.name else self.seed)


class ProgressPrinter:
    """One line per step on stderr: (in a task file, the task,) stage, shot, step, elapsed and time left."""

    def __init__(self, total_steps: int):
        self.total, self.done, self.start = total_steps, 0, time.monotonic()

    def __call__(self, p: Progress) -> None:
        elapsed = time.monotonic() - self.start
        if p.stage == "decode":
            print(f"{RUNNING_TASK.get()}decode  {p.step}/{p.steps} frames  {elapsed:.0f}s", file=sys.stderr, flush=True)
            return
        self.done += 1
        eta = elapsed / self.done * (self.total - self.done)
        where = RUNNING_TASK.get() + ("first frame" if p.stage == "first_frame" else f"shot {p.shot + 1}/{p.shots}")
        print(f"{where}  step {p.step}/{p.steps}  ({p.unet_calls} UNet call{'s' * (p.unet_calls != 1)}/step)  "
              f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left", file=sys.stderr, flush=True)


def prepare(job: Job, pipe: MuseVPipeline | None = None,
            say: bool = True) -> tuple[MuseVPipeline, list[ControlVideo], GenerationPlan]:
    """Load the models (unless given `pipe`) and plan the call as `pipe.generate` will (the size, the ControlNets
    named, the memory), so that a run that cannot go ahead fails before it makes an output folder; say on stderr
    (rank 0's, if `say`) the size and what video2video read. The pipeline, the controls as it takes them
    (keypoints drawn at the video size) and the plan."""
    pipe = pipe or load_pipeline(job.config, job.device, job.dtype)
    config, images, video, sources = job.config, job.inputs.images, job.inputs.video, job.inputs.sources
    g = config.generation
    first = images.get("image", Image.fromarray(video.frames[0]) if video is not None else None)
    height, width = video_size(first, None, g)
    if distributed.is_main() and say:
        print(size_note(first, height, width, config), file=sys.stderr)
        if video is not None or sources:
            print(describe_video2video(video, sources), file=sys.stderr)
    controls = control_videos(config, sources, height, width)
    return pipe, controls, pipe.plan_call(images.get("image"), g, video=None if video is None else video.frames,
                                          control=controls, face_embedding=job.inputs.face)[0]


def generate(job: Job, pipe: MuseVPipeline, controls: list[ControlVideo], plan: GenerationPlan,
             checkpoint: Checkpoint | None = None) -> Iterator[np.ndarray]:
    """Each shot's frames as it is done, with progress on stderr (rank 0's). A resumed run (a checkpoint
    with a loaded state) first decodes the shots the checkpoint holds, then continues from its state (under
    torchrun, rank 0's: `checkpoint.resumed_state`, which says where it resumes)."""
    g, i, images, video = job.config.generation, job.config.input, job.inputs.images, job.inputs.video
    extra = dict(video=None if video is None else video.frames, control=controls) if plan.task == "video2video" else {}
    resume, finished = resumed_state(checkpoint, job.resume, plan)
    if resume is not None:
        finished = ((index, latents.to(pipe.device)) for index, latents in finished)
        for shot in pipe.decoded(finished, plan, resume.first_condition, resume.seed):
            yield shot.frames
    result = pipe.generate(
        i.prompt, images.get("image"), g.replace(seed=job.seed), negative_prompt=i.negative_prompt,
        **job.inputs.references(),
        callback=ProgressPrinter(plan.steps_left(resume)) if distributed.is_main() else None, resume=resume,
        on_state=None if checkpoint is None else checkpoint.on_state, **extra,
    )
    for shot in result:
        if checkpoint is not None:
            checkpoint.save_shot(shot.index, shot.latents)
        yield shot.frames


def sidecar(pipe: MuseVPipeline, job: Job, streams: StreamedOutputs, started: float) -> dict:
    """The run's JSON sidecar: what made the video, to make it again."""
    return {
        "musev_lite_version": __version__,
        "config": job.config.as_dict(),
        "seed": job.seed,
        "frames": streams.frames,
        "height": int(streams.size[0]),
        "width": int(streams.size[1]),
        "fps": job.config.output.fps,
        "dtype": str(pipe.dtype).removeprefix("torch."),  # what model.dtype resolved to
        "device": str(pipe.device),
        "threads": torch.get_num_threads(),  # the same bytes need the same thread count (README)
        "model_files": {Path(f).name: os.path.getsize(f) for f in pipe.files},
        "demo_weights": job.config.model.preset == "tiny",
        "seconds": round(time.monotonic() - started, 2),
    }


def write_outputs(job: Job, out: Path, pipe: MuseVPipeline | None = None) -> list[Path]:
    """Rank 0's part: take the outputs' name, load the models, generate shot by shot into the streamed
    outputs, publish them. In an existing folder the refusals (outputs, or a checkpoint, of this name) come
    before the models load; a new folder is made only once they are loaded and the run passed its checks.
    A full disk or a lost rank keeps a checkpoint that holds a whole state and says how to continue; an
    interrupt leaves as a RunInterrupted saying what was written and what was kept."""
    config = job.config
    stem = config.output.name or f"{job.name or Path(job.config_path).stem}-{job.seed}"
    outputs = OutputSet(out, stem, output_kinds(config.output, stem))
    prepared = None
    if not out.is_dir():
        if job.resume:
            raise ConfigError(f"output.dir {str(out)!r} does not exist, so it holds no checkpoint to resume; "
                              "run without --resume to start, or set the output.dir of the interrupted run")
        prepared = prepare(job, pipe)
        make_output_dir(config.output.dir, config.path_note("output.dir"))
    checkpoint, partials = None, []
    try:
        with outputs:  # the name locked; whatever happens, this run's temporaries go and the lock with them
            refuse_existing(outputs, config.output.overwrite)
            checkpoint = open_checkpoint(config, outputs, job.seed, job.dtype, job.resume)
            pipe, controls, plan = prepared or prepare(job, pipe)
            started = time.monotonic()
            with StreamedOutputs(outputs, config.output.fps, plan.total_frames) as streams:
                try:
                    for frames in generate(job, pipe, controls, plan, checkpoint):
                        streams.append(frames)
                except KeyboardInterrupt:
                    partials = checkpoint.keep(streams) if checkpoint is not None else []
                    raise
                streams.finish(sidecar(pipe, job, streams, started))
            paths = outputs.publish()
            if checkpoint is not None:
                checkpoint.done(outputs)
            return paths
    except (DiskFullError, distributed.RankLostError) as err:  # a checkpoint stays only if it holds a whole state
        if checkpoint is None or checkpoint.saved is None:
            if checkpoint is not None:
                checkpoint.remove()
            raise
        room = "once there is room, " if isinstance(err, DiskFullError) else ""
        raise type(err)(f"{err}; {checkpoint.folder.name} keeps the last saved step: {room}continue with: "
                        f"{job.resume_command()}") from None
    except KeyboardInterrupt as stop:
        saved = checkpoint is not None and checkpoint.saved is not None
        raise RunInterrupted.of(stop, outputs, partials + [checkpoint.folder] if saved else [],
                                job.resume_command() if saved else "") from None


def run(config_path: str, overrides: list[str], resume: bool = False) -> list[Path]:
    """Plan the run and do it; the paths written. `resume`: continue the interrupted run whose checkpoint
    has this name. An interrupt leaves as a RunInterrupted saying what was written and kept."""
    if (tasks := load_tasks(config_path, overrides)) is not None:
        return run_tasks(tasks, config_path, overrides, resume)
    config = load_config(config_path, overrides)
    inputs = read_inputs(config)
    config = with_video_motion_speed(config, inputs, say=True)
    out = check_output_dir(config.output.dir, config.path_note("output.dir"))
    try:  # under torchrun: join the other ranks; they share the work (distributed.py), rank 0 writes
        device = distributed.rank_device(resolve_device(config.model.device, "model.device"))
        distributed.init(device)
        seed = config.generation.seed
        if seed is None:  # under torchrun rank 0's counts (pipeline.seeded_generator; a resumed state's)
            seed = checkpoint_seed(out, Path(config_path).stem) if resume and not config.output.name and \
                distributed.is_main() else random.randrange(10**8)
        job = Job(config, config_path, overrides, resume, inputs, seed, device, resolve_dtype(config.model.dtype, device))
        return write_outputs(job, out) if distributed.is_main() else follow(job)
    finally:
        distributed.shutdown()


def follow(job: Job, pipe: MuseVPipeline | None = None) -> list[Path]:
    """A rank that shares another rank's run (distributed.py): its part of the work; nothing is written."""
    for _ in generate(job, *prepare(job, pipe)):
        pass
    return []


def run_tasks(tasks: list[Task], config_path: str, overrides: list[str], resume: bool) -> list[Path]:
    """A file of [[task]] tables: the models loaded once, each task a run of its own (`tasks.run_all`)."""
    def job(task: Task, seed: int, resume: bool, device: str, dtype: torch.dtype) -> Job:  # to check, to run
        inputs = read_inputs(task.config)
        config = with_video_motion_speed(task.config, inputs)
        return Job(config, config_path, overrides, resume, inputs, seed, device, dtype, task.name)

    return run_all(tasks, resume, job, lambda pipe, job: prepare(job, pipe, say=False),
                   lambda pipe, job: write_outputs(job, Path(job.config.output.dir), pipe), lambda pipe, job: follow(job, pipe))


def command(args: argparse.Namespace) -> list[Path]:
    """What the command line asks for, with SIGINT and SIGTERM raising RunInterrupted: the configuration
    printed, or a run; the paths written."""
    with signals_interrupt():
        if args.print_config:
            print(resolved_toml(args.config, args.set), end="")
            return []
        return run(args.config, args.set, args.resume)


def main(argv: list[str] | None = None, prog: str = "python -m musev_lite.run") -> int:
    """The command line; `prog` is how its help names it (`musev-lite run` from musev_lite/__main__.py).
    Under torchrun every rank checks the same configuration, so a mistake or an interrupt is reported by
    the first rank of each node only (`distributed.reports`); every rank exits with its code."""
    parser = argparse.ArgumentParser(prog=prog, description="Generate a video with MuseV's parallel denoising.")
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
        return exit_code(lambda: command(args), distributed.reports())  # a ValueError: "error: ...", 2
    except distributed.RankLostError as err:  # under torchrun: another rank died or hung
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # RunInterrupted (SIGINT, SIGTERM), or a Ctrl-C no handler caught
        interrupted = stop if isinstance(stop, RunInterrupted) else RunInterrupted()
        if distributed.reports():
            print(interrupted.report(), file=sys.stderr)
        for path in interrupted.published():
            print(path)
        return 128 + interrupted.signum
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        print(f"error: out of memory ({str(err).splitlines()[0][:200]}); nothing was written. Lower "
              "generation.height/width, num_frames, n_batch or window_batch, or free memory", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Resumable runs: where a generation is, saved beside its outputs, so that an interrupted run continues
to the same video, bit for bit (`python -m musev_lite.run config.toml --resume`).

A run with `output.checkpoint = true` keeps a folder `NAME.checkpoint/`:

    state.safetensors        the pipeline's `RunState` (shot, step, that shot's latents, the random
                             generator's state, frame 0's latent) and the fingerprint of the settings
                             and inputs that decide the video
    shot_00000.safetensors   each finished shot's clean latents; a resumed run decodes them again, so
                             its outputs hold every frame without keeping any of them in memory

Every file is written atomically (a temporary name, then a rename), so a run killed at any moment, even
by SIGKILL, leaves the last complete state. A finished run removes the folder. Here too: the fingerprint
(`fingerprint`: the settings, the resolved dtype, the seed, the input files' sha256), the seed of a resumed
run whose seed was drawn (`checkpoint_seed`), the command that continues a run (`resume_command`), a
run's checkpoint opened, or an old one refused or cleared (`open_checkpoint`), and under torchrun rank 0's
checkpoint sent to the other ranks (`resumed_state`): the state is the same on every rank, so rank 0 alone
saves it and any number of ranks resumes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import distributed
from .config import RunConfig
from .limits import folder_problem, parse_nested, room_for
from .outputs import ROOM_FIX, OutputSet, StreamedOutputs, signals_held
from .plan import GenerationPlan, RunState
from .settings import ConfigError
from .weights import atomic_path

FORMAT = "musev_lite checkpoint 1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, unreadable, or made with other settings."""


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, for naming the settings that differ."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_state(path: Path, state: RunState, fingerprint: dict) -> None:
    """`state` and the `fingerprint` of its run as one safetensors file, atomically."""
    tensors = {"condition": state.condition, "first_condition": state.first_condition, "generator": state.generator}
    if state.latents is not None:
        tensors["latents"] = state.latents
    meta = {"format": FORMAT, "shot": str(state.shot), "step": str(state.step), "seed": json.dumps(state.seed),
            "fingerprint": json.dumps(fingerprint, sort_keys=True)}
    tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}
    write_tensors(path, tensors, meta)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """A safetensors file (its folder made if missing), atomically; a full disk is one DiskFullError saying
    how much it needs."""
    needed = sum(t.nbytes for t in tensors.values()) + len(json.dumps(meta)) + 100 * len(tensors)  # + its header
    with room_for(path.parent.parent, f"{path.parent.name}/{path.name}", needed=needed, fix=ROOM_FIX), \
            atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_state(path: Path) -> tuple[RunState, dict]:
    """The `RunState` saved at `path` and its run's fingerprint."""
    try:
        with safe_open(path, "pt") as f:  # one read: the tensors and the metadata
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT!r} file")
        state = RunState(int(meta["shot"]), int(meta["step"]), tensors["condition"], tensors.get("latents"),
                         tensors["first_condition"], tensors["generator"], parse_nested(json.loads, meta["seed"], "seed"))
        fingerprint = parse_nested(json.loads, meta["fingerprint"], "fingerprint")
        if not isinstance(fingerprint, dict) or not (state.seed is None or isinstance(state.seed, int)):
            raise ValueError("its fingerprint or seed is not of a checkpoint")
        return state, fingerprint
    except (OSError, SafetensorError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err}); delete its folder to start over") from None


class Checkpoint:
    """The checkpoint folder of one run. `on_state` is the pipeline's `generate(on_state=...)` callback:
    it saves the state at every shot's start and every `every` steps (0: at shot starts only), and
    keeps the newest one in memory so that an interrupt can save it too (`save_latest`)."""

    def __init__(self, folder: Path, fingerprint: dict, every: int = 1):
        self.folder, self.fingerprint, self.every = Path(folder), fingerprint, every
        problem = folder_problem(self.folder)
        if problem:  # not ours: neither resumed nor deleted
            raise CheckpointError(f"{self.folder} {problem}, so it holds no checkpoint of this run's name; move or "
                                  "delete it, or choose another output.name")
        self.state_path = self.folder / "state.safetensors"
        self.latest: RunState | None = None
        self.saved: RunState | None = None

    def exists(self) -> bool:
        return self.state_path.exists()

    def on_state(self, state: RunState) -> None:
        latents = None if state.latents is None else state.latents.detach().to("cpu", copy=True)
        self.latest = RunState(state.shot, state.step, state.condition.detach().cpu(), latents,
                               state.first_condition.detach().cpu(), state.generator.clone(), state.seed)
        if state.step == 0 or (self.every and state.step % self.every == 0):
            self.save(self.latest)

    def save(self, state: RunState) -> None:
        save_state(self.state_path, state, self.fingerprint)
        self.saved = state

    def save_latest(self) -> RunState | None:
        """Save the newest state if it is newer than the saved one (on an interrupt); the saved state."""
        if self.latest is not None and self.latest is not self.saved:
            self.save(self.latest)
        return self.saved

    def save_shot(self, index: int, latents: torch.Tensor) -> None:
        write_tensors(self.folder / f"shot_{index:05d}.safetensors", {"latents": latents.detach().cpu().contiguous()})

    def load(self) -> RunState:
        """The saved state, if it was made with this run's fingerprint; else a CheckpointError naming
        the settings that differ."""
        if not self.exists():
            raise CheckpointError(f"{self.folder}: no checkpoint to resume (a run saves one with output.checkpoint = "
                                  "true); run without --resume to start")
        state, fingerprint = load_state(self.state_path)
        ours, theirs = flat(self.fingerprint), flat(fingerprint)
        differ = [f"{key} ({theirs.get(key, 'unset')!r} then, {ours.get(key, 'unset')!r} now)"
                  for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
        if differ:
            raise CheckpointError(f"{self.folder} was made with other settings: {'; '.join(differ[:4])}"
                                  f"{f' and {len(differ) - 4} more' if len(differ) > 4 else ''}; resume with the "
                                  "same configuration, or delete the folder to start over")
        self.saved = self.latest = state
        return state

    def finished_shots(self, before: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, clean latents) of the shots before `before`, as saved."""
        for index in range(before):
            path = self.folder / f"shot_{index:05d}.safetensors"
            try:
                latents = load_file(path)["latents"]
            except (OSError, SafetensorError, KeyError) as err:
                raise CheckpointError(f"{path}: shot {index + 1} of the checkpoint cannot be read ({err}); "
                                      "delete the folder to start over") from None
            size = tuple(self.saved.condition.shape[-2:]) if self.saved is not None else tuple(latents.shape[-2:])
            if latents.ndim != 5 or tuple(latents.shape[:2]) != (1, 4) or tuple(latents.shape[-2:]) != size \
                    or latents.dtype != torch.float32:
                raise CheckpointError(f"{path}: shot {index + 1} holds {latents.dtype} latents {tuple(latents.shape)}, "
                                      f"not float32 (1, 4, frames, {size[0]}, {size[1]}) as the saved state; delete "
                                      "the folder to start over")
            yield index, latents

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def keep(self, streams: StreamedOutputs) -> list[Path]:
        """On an interrupt while generating: save the newest state and, with a state saved, keep the finished
        shots' outputs under partial names (a second Ctrl-C waits until both are done); the partials kept."""
        with signals_held():
            self.save_latest()
            return streams.keep_partial() if self.saved is not None else []

    def done(self, outputs: OutputSet) -> None:
        """The run's outputs are published: the checkpoint and the partial outputs it continued go."""
        with signals_held():
            self.remove()
            outputs.remove_partials()


# ---------------------------------------------------------------------------------------------
# A run's checkpoint


def fingerprint(config: RunConfig, seed: int, dtype: torch.dtype) -> dict:
    """What decides the video, for a checkpoint: every setting but the output's and the device, the models'
    dtype as resolved (`dtype`: model.dtype "auto" resolved), the seed, and the content of every input file
    (sha256)."""
    settings = config.as_dict()
    del settings["output"]
    settings["model"] = {k: v for k, v in settings["model"].items() if k not in ("device", "compile")}
    settings["model"]["dtype"] = str(dtype).removeprefix("torch.")
    settings["generation"]["seed"] = seed
    i = config.input
    paths = {f"input.{key}": getattr(i, key)
             for key in ("image", "refer_image", "ip_adapter_image", "face_embedding", "face_image", "video")}
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


def checkpoint_seed(folder: Path, config_stem: str) -> int:
    """The seed of the one checkpoint `<config name>-<seed>.checkpoint` in `folder` (a resumed run whose
    seed was drawn)."""
    name = re.compile(rf"{re.escape(config_stem)}-(\d+)\.checkpoint")
    seeds = sorted(int(m[1]) for p in (folder.iterdir() if folder.is_dir() else []) if (m := name.fullmatch(p.name)))
    if len(seeds) != 1:
        found = f"{len(seeds)} ({', '.join(f'{config_stem}-{s}.checkpoint' for s in seeds)})" if seeds else "none"
        raise ConfigError(f"--resume without generation.seed looks for one checkpoint {config_stem}-<seed>.checkpoint in "
                          f"{folder} and found {found}; say which with --set generation.seed=<seed>")
    return seeds[0]


def resume_command(config_path: str, overrides: list[str], config: RunConfig, seed: int | None) -> str:
    """The command that continues this run (the drawn seed added when the config leaves it unset; `seed`
    None: never, as for a task file, whose tasks find their drawn seeds by name)."""
    args = [config_path] + [a for o in overrides for a in ("--set", o)]
    if config.generation.seed is None and seed is not None:
        args += ["--set", f"generation.seed={seed}"]
    return "python -m musev_lite.run " + " ".join(shlex.quote(a) for a in args + ["--resume"])


def open_checkpoint(config: RunConfig, outputs: OutputSet, seed: int, dtype: torch.dtype,
                    resume: bool) -> Checkpoint | None:
    """The run's checkpoint folder (NAME.checkpoint) with `output.checkpoint` or `resume`, loaded for a
    resume. A checkpoint left by an interrupted run of this name is not overwritten unless output.overwrite
    (then it and the partial outputs go)."""
    folder = outputs.folder / f"{outputs.stem}.checkpoint"
    checkpoint = Checkpoint(folder, fingerprint(config, seed, dtype), config.output.checkpoint_every)
    if resume:
        checkpoint.load()
        return checkpoint
    if folder.exists():
        if not config.output.overwrite:
            raise ConfigError(f"{folder} holds an interrupted run of this name: continue it with --resume, or set "
                              "output.overwrite = true to start over (it is deleted)")
        checkpoint.remove()
    outputs.remove_partials()
    return checkpoint if config.output.checkpoint else None


def resumed_state(checkpoint: Checkpoint | None, resuming: bool,
                  plan: GenerationPlan) -> tuple[RunState | None, Iterator | None]:
    """The state a run continues from and an iterator of its finished shots `(index, latents)`: the loaded
    checkpoint's (None, None when not resuming), said on stderr. Under torchrun rank 0 alone has opened the
    checkpoint; every rank calls this and the others get the state and, as they are taken, each finished shot
    from it."""
    state = checkpoint.saved if checkpoint is not None else None
    shots = checkpoint.finished_shots(state.shot) if state is not None else None
    if state is not None:
        where = (f"shot {state.shot + 1}/{plan.shots} at step {state.step}/{plan.config.steps}"
                 if state.shot < plan.shots else "all shots")
        print(f"resuming {checkpoint.folder.name}: {state.shot} of {plan.shots} shots done, {where}; "
              f"decoding the {state.shot} done", file=sys.stderr, flush=True)
    ranks = distributed.current()
    if not resuming or ranks is None:
        return state, shots
    state = ranks.broadcast(state, "sharing the checkpoint")
    return state, (ranks.broadcast(next(shots) if ranks.rank == 0 else None, f"sharing finished shot {n + 1}")
                   for n in range(state.shot))

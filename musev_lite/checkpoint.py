"""Resumable runs: where a generation is, saved beside its outputs, so that an interrupted run continues
to the same video, bit for bit (`python -m musev_lite.run config.toml --resume`).

A run with `output.checkpoint = true` keeps a folder `NAME.checkpoint/`:

    state.safetensors        the pipeline's `RunState` (shot, step, that shot's latents, the random
                             generator's state, frame 0's latent) and the fingerprint of the settings
                             and inputs that decide the video
    shot_00000.safetensors   each finished shot's clean latents; a resumed run decodes them again, so
                             its outputs hold every frame without keeping any of them in memory

Every file is written atomically (a temporary name, then a rename), so a run killed at any moment, even
by SIGKILL, leaves the last complete state. A finished run removes the folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .pipeline import RunState
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
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, tmp, metadata=meta)


def load_state(path: Path) -> tuple[RunState, dict]:
    """The `RunState` saved at `path` and its run's fingerprint."""
    try:
        with safe_open(path, "pt") as f:  # one read: the tensors and the metadata
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT!r} file")
        state = RunState(int(meta["shot"]), int(meta["step"]), tensors["condition"], tensors.get("latents"),
                         tensors["first_condition"], tensors["generator"], json.loads(meta["seed"]))
        return state, json.loads(meta["fingerprint"])
    except (OSError, SafetensorError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err}); delete its folder to start over") from None


class Checkpoint:
    """The checkpoint folder of one run. `on_state` is the pipeline's `generate(on_state=...)` callback:
    it saves the state at every shot's start and every `every` steps (0: at shot starts only), and
    keeps the newest one in memory so that an interrupt can save it too (`save_latest`)."""

    def __init__(self, folder: Path, fingerprint: dict, every: int = 1):
        self.folder, self.fingerprint, self.every = Path(folder), fingerprint, every
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
        self.folder.mkdir(exist_ok=True)
        save_state(self.state_path, state, self.fingerprint)
        self.saved = state

    def save_latest(self) -> RunState | None:
        """Save the newest state if it is newer than the saved one (on an interrupt); the saved state."""
        if self.latest is not None and self.latest is not self.saved:
            self.save(self.latest)
        return self.saved

    def save_shot(self, index: int, latents: torch.Tensor) -> None:
        self.folder.mkdir(exist_ok=True)
        with atomic_path(self.folder / f"shot_{index:05d}.safetensors") as tmp:
            save_file({"latents": latents.detach().cpu().contiguous()}, tmp)

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
            yield index, latents

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

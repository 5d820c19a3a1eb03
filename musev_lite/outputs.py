"""One run's outputs: written under temporary names, published together, and what an interrupt left.

`OutputSet` makes a run's files appear together or not at all and keeps two runs off one name (a pid
lock); `signals_held` keeps SIGINT and SIGTERM from stopping its renames half-way. `StreamedOutputs`
writes the files as the shots come, and on an interrupt keeps the finished shots under partial names
for a resume. `RunInterrupted` is what a signal raises (`signals_interrupt`) and what the run raises
again once it knows what it wrote and kept; its `report` is the one line the command prints.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .limits import folder_problem, room_for
from .settings import ConfigError
from .video_io import MediaError, Mp4Writer, contact_sheet, sheet_picks, write_animation, write_image, write_json
from .weights import temporary_affixes

ROOM_FIX = "free some space or choose another output.dir"


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block (a few renames or removals) is done, so it is never left
    half-way; they are delivered right after it. A no-op where signals cannot be blocked (Windows)."""
    mask = getattr(signal, "pthread_sigmask", None)
    old = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if mask else None
    try:
        yield
    finally:
        if mask:
            mask(signal.SIG_SETMASK, old)


def lock_holder(path: Path) -> int | None:
    """The process id a lock file holds, None if it holds none (or is gone)."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no harmless check there: such a lock is never taken over
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class OutputSet:
    """The outputs of one run, all named after `stem` in `folder`, appearing together or not at all.

    `kinds` names each output and what it holds (a format, "sheet" or "json"; `config.output_kinds`).
    Writers write output `name` to `path(name)`, in a staging folder `.<stem>.<pid>.tmp/` beside the
    outputs; `publish()` renames them all into place, in the order of `names` (the sidecar last), with
    signals held. Leaving the `with` block removes the staging folder, whatever happened. While in the
    block, `<stem>.lock` (created with O_EXCL, holding the pid) keeps other runs off the name: they
    get a MediaError; the lock of a process that no longer runs is taken over. On entry, temporaries
    an earlier run left for this stem (killed before it could clean up) are removed: under the lock
    they can be no one else's. `notes` says what entering took over or removed.
    """

    def __init__(self, folder: Path, stem: str, kinds: dict[str, str]):
        self.folder, self.stem, self.kinds, self.names = Path(folder), stem, dict(kinds), list(kinds)
        self.lock = self.folder / f"{stem}.lock"
        self.staging = self.folder / f".{stem}.{os.getpid()}.tmp"
        self.notes: list[str] = []
        self.published: list[Path] = []
        self.locked = False

    def path(self, name: str) -> Path:
        """Where output `name` is written until it is published."""
        return self.staging / name

    def existing(self) -> list[Path]:
        """Outputs of this set that are already in the folder (from an earlier run)."""
        return [self.folder / name for name in self.names if os.path.lexists(self.folder / name)]

    def remove_partials(self) -> None:
        """The partial outputs an interrupted run of this name kept (NAME.partial.mp4, NAME_frames.partial)."""
        for name in self.names:
            path = self.folder / partial_name(name)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif os.path.lexists(path):
                path.unlink()

    def stale_temporaries(self) -> list[Path]:
        """Temporaries of this stem's outputs: staging folders `.<stem>.<pid>.tmp` and the single-file
        temporaries of `weights.atomic_path` (`.<stem>.xxxxxxxx.tmp.mp4`, `.<stem>_frames.xxxxxxxx.tmp`, ...)."""
        stem = re.escape(self.stem)
        ours = re.compile(rf"\.{stem}\.\d+\.tmp|\.{stem}\.[a-z0-9_]{{8}}\.tmp\.(mp4|gif|webp|json)"
                          rf"|\.{stem}_sheet\.[a-z0-9_]{{8}}\.tmp\.png|\.{stem}_frames\.[a-z0-9_]{{8}}\.tmp")
        return sorted(p for p in self.folder.glob(".*.tmp*") if ours.fullmatch(p.name))

    def __enter__(self) -> OutputSet:
        try:
            with signals_held():
                self._take_lock()
                stale = self.stale_temporaries()
                for path in stale:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                if stale:
                    self.notes.append(f"removed temporaries an interrupted run left in {self.folder}: "
                                      + ", ".join(p.name for p in stale))
                with room_for(self.folder, self.staging.name, fix=ROOM_FIX):
                    self.staging.mkdir()
        except BaseException:  # a refusal, or a signal held back until now
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        with signals_held():
            shutil.rmtree(self.staging, ignore_errors=True)
            self._release()

    def publish(self) -> list[Path]:
        """Rename every output into place, replacing an existing one of the same name; return the paths."""
        with signals_held():
            for name in self.names:
                new, final = self.path(name), self.folder / name
                if os.path.lexists(final) and (new.is_dir() or (final.is_dir() and not final.is_symlink())):
                    os.replace(final, self.staging / f".old.{name}")  # a folder is not replaced by a rename
                try:
                    os.replace(new, final)
                except OSError as err:
                    done = ", ".join(p.name for p in self.published) or "none"
                    raise MediaError(f"{final}: cannot be written ({err.strerror}); published before it: {done}") from None
                self.published.append(final)
        return self.published

    def _take_lock(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock_holder(self.lock)
                if holder is None or (holder != os.getpid() and process_alive(holder)):
                    who = f"another run (pid {holder})" if holder else "a lock file without a process id"
                    raise MediaError(f"{self.lock}: {who} is writing outputs named {self.stem!r} in {self.folder}; "
                                     "wait for it, or set another output.name (delete the lock file if no run is "
                                     "writing there)") from None
                # its process is gone: move the lock aside (only one run can) and check it was that one
                aside = self.folder / f".{self.lock.name}.{os.getpid()}.stale"
                try:
                    os.replace(self.lock, aside)
                except FileNotFoundError:
                    continue  # another run took it over first
                if lock_holder(aside) != holder:  # a fresh lock came meanwhile: give it back
                    try:
                        os.link(aside, self.lock)
                    except FileExistsError:
                        pass
                else:
                    self.notes.append(f"took over {self.lock}: its run (pid {holder}) no longer runs")
                aside.unlink()
                continue
            try:
                with room_for(self.folder, self.lock.name, fix=ROOM_FIX), os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except BaseException:  # no lock without a process id in it
                self.lock.unlink()
                raise
            self.locked = True
            return
        raise MediaError(f"{self.lock}: other runs keep taking this lock; try again")

    def _release(self) -> None:
        if self.locked and lock_holder(self.lock) == os.getpid():
            self.lock.unlink()
        self.locked = False


def partial_name(name: str) -> str:
    """v.mp4 -> v.partial.mp4, v_frames -> v_frames.partial: the finished shots of an interrupted run."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.partial.{suffix}" if dot else f"{name}.partial"


PID_DIGITS = 7  # Linux process ids stay below 2**22 (the most pid_max allows)


def names_beside(stem: str, names: list[str]) -> list[str]:
    """Every name a run writing the outputs `names` (named after `stem`) may give an entry of its output
    folder or of its staging folder: the outputs, their partial names, `atomic_path`'s temporaries and the
    `.old.` names of `publish`, the staging folder, the lock and its stale name, the checkpoint folder.
    Process ids are taken at their longest (PID_DIGITS), tempfile's random part as its 8 characters."""
    pid = "9" * PID_DIGITS
    beside = [f".{stem}.{pid}.tmp", f"{stem}.lock", f".{stem}.lock.{pid}.stale", f"{stem}.checkpoint"]
    for name in names:
        beside += [name, partial_name(name), f".old.{name}"]
        for is_dir in (False, True):
            prefix, suffix = temporary_affixes(Path(name), is_dir)
            beside.append(f"{prefix}xxxxxxxx{suffix}")
    return beside


# ---------------------------------------------------------------------------------------------
# The run's files


def check_output_dir(folder: str, path_note: str = "") -> Path:
    """output.dir, checked writable without being made: a temporary file is made and removed in it, or,
    when it does not exist yet, in the nearest folder above it that does (where it will be made).
    `path_note` says how a relative path was resolved (`RunConfig.path_note`)."""
    out = Path(folder)
    try:
        existing = next(parent for parent in [out, *out.absolute().parents] if os.path.lexists(parent))
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
    except OSError as err:
        why = f"it {folder_problem(out)}" if folder_problem(out) else err.strerror
        raise ConfigError(f"output.dir {str(out)!r} is not writable ({why}); choose another folder"
                          f"{path_note}") from None
    return out


def make_output_dir(folder: str, path_note: str = "") -> Path:
    """output.dir made, once the run has passed every check: a run that fails before writes nothing."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output.dir {str(out)!r} cannot be made ({err.strerror}); choose another folder"
                          f"{path_note}") from None
    return out


def refuse_existing(outputs: OutputSet, overwrite: bool) -> None:
    """Say what entering `outputs` cleaned up; refuse outputs of the same name unless `overwrite`
    (output.overwrite)."""
    for note in outputs.notes:
        print(f"note: {note}", file=sys.stderr)
    existing = outputs.existing()
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of this run's outputs)" if len(existing) > 1 else ""
        raise ConfigError(f"{existing[0]} already exists{more}; set output.overwrite = true to replace it, "
                          "or choose another output.name or output.dir")


class StreamedOutputs:
    """The run's outputs, written as its shots come: the mp4 through an encoder that stays open, PNG frames
    a file at a time, the contact sheet's frames picked as they pass, so memory does not grow with the
    video's length. GIF and WebP are written at the end from frames kept in memory (Pillow writes an
    animation at once): they are for short clips. Everything goes under `outputs`' temporary names, at
    `fps` frames per second."""

    def __init__(self, outputs: OutputSet, fps: float, total_frames: int):
        self.outputs, self.kinds, self.fps = outputs, outputs.kinds, fps
        self.frames, self.size = 0, (0, 0)
        self.picks = set(sheet_picks(total_frames)) if "sheet" in self.kinds.values() else set()
        self.sheet, self.animation = [], []
        self.mp4 = self.png = None
        try:
            for name, kind in self.kinds.items():
                with self.room(name):
                    if kind == "mp4":
                        self.mp4_name, self.mp4 = name, Mp4Writer(outputs.path(name), self.fps)
                    elif kind == "png":
                        self.png_name, self.png = name, outputs.path(name)
                        self.png.mkdir()
        except BaseException:
            self.__exit__(*sys.exc_info())  # no `with` block to close the mp4 yet
            raise

    def room(self, name: str):
        """A full disk while writing output `name` is one DiskFullError naming output.dir (`limits.room_for`)."""
        return room_for(self.outputs.folder, name, written=self.outputs.staging, fix=ROOM_FIX)

    def __enter__(self) -> StreamedOutputs:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.mp4 is not None:
            self.mp4.abort()  # the staging folder goes with it

    def append(self, frames: np.ndarray) -> None:
        """Write a shot's frames (n, H, W, 3) to every streamed output."""
        if self.mp4 is not None:
            with self.room(self.mp4_name):
                self.mp4.write(frames)
        for n, frame in enumerate(frames, start=self.frames):
            if self.png is not None:
                with self.room(self.png_name), open(self.png / f"{n:05d}.png", "wb") as f:  # a partial frame stays
                    Image.fromarray(frame).save(f, format="PNG")  # until room() has measured it
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
            with self.room(self.mp4_name):
                mp4.close()
        for name, kind in self.kinds.items():
            path = self.outputs.path(name)
            with self.room(name):
                if kind in ("gif", "webp"):
                    print(f"writing {name}", file=sys.stderr, flush=True)
                    write_animation(path, self.animation, self.fps)
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


# ---------------------------------------------------------------------------------------------
# Interrupts


@dataclass(eq=False)
class RunInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped a run. It unwinds like Ctrl-C, so every `with` and `finally`
    on the way cleans up. `signals_interrupt` raises it bare (the run stopped while starting); the run
    raises it again with what it left (`of`)."""

    signum: int = signal.SIGINT
    outputs: OutputSet | None = None  # None: stopped before its outputs were set up
    kept: list[Path] = field(default_factory=list)  # the finished shots' partial outputs and the checkpoint
    resume: str = ""  # the command that continues the run ("" when nothing was kept for it)

    def __post_init__(self):
        super().__init__(signal.Signals(self.signum).name)

    @classmethod
    def of(cls, stop: KeyboardInterrupt, outputs: OutputSet, kept: list[Path], resume: str) -> RunInterrupted:
        """`stop` (a signal's RunInterrupted, or the KeyboardInterrupt of a Ctrl-C no handler caught) with
        what the run left."""
        return cls(stop.signum if isinstance(stop, cls) else signal.SIGINT, outputs, kept, resume)

    def published(self) -> list[Path]:
        """The outputs the run had published (all of them) before it stopped."""
        return self.outputs.published if self.outputs is not None else []

    def report(self) -> str:
        """What the run did and did not write, in one line."""
        name, outputs = signal.Signals(self.signum).name, self.outputs
        if outputs is None:
            return f"interrupted ({name}) while starting: nothing was written"
        if outputs.published:
            return f"interrupted ({name}) after the outputs were complete: wrote {', '.join(outputs.names)} in {outputs.folder}"
        existing = "; the existing outputs of that name are unchanged" if outputs.existing() else ""
        if self.resume:
            kept = ", ".join(path.name for path in self.kept)
            return (f"interrupted ({name}): {', '.join(outputs.names)} were not written; kept {kept} in {outputs.folder}"
                    f"{existing}; continue with: {self.resume}")
        return (f"interrupted ({name}): nothing was written ({', '.join(outputs.names)} in {outputs.folder} were not) "
                f"and no temporary file is left{existing}")


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise RunInterrupted (signals reach only the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise RunInterrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

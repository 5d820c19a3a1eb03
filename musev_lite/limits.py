"""Limits of sane input and of the machine, checked in one place each, so that every caller says the same.

  * file names built from a user's string (output names, weights-folder components, textual-inversion
    words): `file_stem` keeps them one plain name inside the folder they are written to;
  * the file system's longest name (`name_max`), so a name that would not fit is refused up front;
  * nesting of parsed TOML / JSON (`parse_nested`): deeper than MAX_NESTING levels is refused, before
    Python's parsers run out of stack;
  * why a folder cannot be written to (`folder_problem`): a file, a device, a symbolic-link loop;
  * a full disk (`room_for`): one DiskFullError naming the folder, the bytes free and what the write
    needed or had written, instead of an OSError from deep inside an encoder.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Arrays / objects / tables inside each other. Our own files nest at most 5 deep (a checkpoint's
# fingerprint: settings, section, list of tables, table, list); 32 leaves room for any real file
# and stays far below where Python's parsers hit the recursion limit (~500 for TOML).
MAX_NESTING = 32
NAME_MAX = 255  # the longest file name (bytes) when the file system does not say: ext4, XFS, APFS, NTFS
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class PathError(ValueError):
    """A name or folder the program would write to cannot be used."""


class NestingError(ValueError):
    """A TOML / JSON file nested deeper than MAX_NESTING levels."""


class DiskFullError(ValueError):
    """The disk (or the user's quota) filled up while writing; what was written of it is removed. `free` and
    `amount` are what `room_for` measured where the write failed."""

    free: int = 0
    amount: str = ""


def file_stem(where: str, value, error: type[ValueError] = PathError) -> str:
    """`value` as the stem of files written into a folder: a non-empty string that names one entry of the
    folder (no / \\ or NUL, so it cannot leave it) and is not hidden (no leading dot, which also refuses
    . and ..). Raises `error` naming `where` otherwise."""
    if not isinstance(value, str) or value == "":
        raise error(f"{where} = {value!r} must be a non-empty name")
    if any(c in value for c in "/\\\0"):
        raise error(f"{where} = {value!r} must be a file stem, not a path: one name, without / or \\")
    if value.startswith("."):
        raise error(f"{where} = {value!r} must not start with a dot (it would be hidden, or leave the folder)")
    return value


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest parent that exists (a folder to be made lands on that one's file system)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, the file system of `folder` (or of its nearest existing parent)
    allows: `os.pathconf(PC_NAME_MAX)`, or NAME_MAX where it does not say."""
    try:
        return int(os.pathconf(nearest_existing(Path(folder)), "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why `path` (or a parent of it) cannot be a folder to write into: "is a file, not a folder", "is a
    character device, not a folder", "is a symbolic link loop"; None when nothing in the way is known."""
    path = Path(os.path.abspath(path))
    for place in reversed([path, *path.parents]):
        try:
            mode = os.stat(place).st_mode
        except FileNotFoundError:
            return None  # made later, with its parents
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "is a symbolic link loop" if place == path else f"passes through a symbolic link loop at {place}"
            return None
        if not stat.S_ISDIR(mode):
            kind = ("a file" if stat.S_ISREG(mode) else "a character device" if stat.S_ISCHR(mode)
                    else "a block device" if stat.S_ISBLK(mode) else "a pipe or socket")
            where = "is" if place == path else f"is inside {place}, which is"
            return f"{where} {kind}, not a folder"
    return None


def nesting_depth(value) -> int:
    """How deep lists and dicts nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_nested(parse: Callable[[str], object], text: str, where: str, error: type[ValueError] = NestingError):
    """`parse(text)` (json.loads, tomllib.loads) refusing a value nested deeper than MAX_NESTING levels with
    one `error` naming `where`; the parser's own errors pass through."""
    try:
        value = parse(text)
        deep = nesting_depth(value) > MAX_NESTING
    except RecursionError:
        deep = True
    if deep:
        raise error(f"{where}: arrays or tables are nested more than {MAX_NESTING} levels deep; no setting or "
                    "keypoint file nests that deep, so check that this is the right file or value")
    return value


def tree_bytes(path: str | os.PathLike | None) -> int:
    """Bytes of the file at `path`, or of every file under the folder `path`; 0 if it is gone."""
    if path is None:
        return 0
    path = Path(path)
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:
        return 0


def byte_text(n: int) -> str:
    """12 bytes, 34.5 kB, 6.7 MB, 8.9 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def no_space(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, says the disk or the quota is full: an OSError with
    ENOSPC / EDQUOT, or an error that carries the OS's message (safetensors raises its own error type for a
    failed write; av wraps the OSError of a Python file object in its callback error)."""
    for _ in range(8):  # the chain of causes, not followed forever
        if err is None:
            return False
        text = str(err)
        if (isinstance(err, OSError) and err.errno in NO_SPACE) or "No space left on device" in text \
                or any(f"os error {code})" in text for code in NO_SPACE):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def room_for(folder: str | os.PathLike, what: str, needed: int | None = None, written: str | os.PathLike | None = None,
             fix: str = "free some space or write to another folder") -> Iterator[None]:
    """Writing `what` into `folder`: a full disk (`no_space`) becomes one DiskFullError naming the folder,
    the bytes free there and what the write `needed` (when known) or had `written` (the size of that file
    or folder when the disk filled). Nested, the innermost measures (before its partial file is removed)
    and the outermost names the folder and the fix the user knows. The caller removes the partial files
    (atomic writes do)."""
    try:
        yield
    except Exception as err:
        if isinstance(err, DiskFullError):
            free, amount = err.free, err.amount
        elif no_space(err):
            try:
                free = shutil.disk_usage(nearest_existing(Path(folder))).free
            except OSError:
                free = 0
            amount = (f"it needs about {byte_text(needed)}" if needed is not None
                      else f"{byte_text(tree_bytes(written))} written when it filled")
        else:
            raise
        full = DiskFullError(f"{folder}: no space left on the device while writing {what} ({byte_text(free)} free, "
                             f"{amount}); the partial files are removed; {fix}")
        full.free, full.amount = free, amount
        raise full from None

"""One video on several devices: every denoising step's windows shared out over the ranks of a
torch.distributed process group, as torchrun launches them (docs/method.md#several-devices).

    torchrun --nproc-per-node 2 -m musev_lite.run config.toml   # 2 GPUs (NCCL) or 2 CPU processes (gloo)

Within a step the windows are independent: all are at the same noise level around the same clean
condition frame, and only the per-frame average of overlapping predictions couples them. So each rank
denoises its share of the windows (`assign_windows`), the per-frame prediction sums are added up over
the ranks (one all-reduce of a latent-sized tensor per step) and every rank takes the same sampler step
on the same latents. Every rank draws the same noise from rank 0's seed, so the video does not depend on
the number of ranks. The VAE decode is shared out by chunks of frames; rank 0 writes the files.

Every rank beats a heartbeat in the rendezvous store (`Heartbeat`), so that when a collective fails the
others can say which rank is lost, the one whose heartbeat stopped, rather than only that one is.

A task file shares out whole tasks instead (`assign_tasks`): with at least as many tasks as ranks each task
runs on one rank alone, with no communication (`sharing(None)`); with fewer, the ranks of a task share its
windows over a process group of their own (`Ranks.subgroup`).

Launched without torchrun (no WORLD_SIZE > 1 in the environment) none of this runs. From Python, a
pipeline called inside an initialised process group (`init()`, or torch's own) shares its work the same way.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_VARIABLE = "MUSEV_LITE_DIST_TIMEOUT"  # seconds a rank waits for the others before giving up
DEFAULT_TIMEOUT = 600.0
JOIN_TIMEOUT = 60.0  # seconds the ranks wait for each other to start (at most the timeout above)
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets; env:// reads them
HEARTBEAT_SECONDS = 1.0  # how often each rank says in the rendezvous store that it is alive
LOST_AFTER = 3  # heartbeats a rank may miss, once a collective failed, before the others call it lost


_WORLD = object()  # `current()` as the process group says, outside `sharing(...)`
SHARING: ContextVar = ContextVar("musev_lite_sharing", default=_WORLD)


class RankLostError(RuntimeError):
    """Another rank died, or did not answer within the timeout."""


class DistributedConfigError(ValueError):
    """A distributed launch this configuration cannot run."""


class Heartbeat:
    """This rank's heartbeat: a daemon thread adds 1 to the rank's counter in the rendezvous store every
    HEARTBEAT_SECONDS for as long as the process lives (on a store of its own, `Store.clone`, as torch asks
    of a second thread). A rank that is alive, even stuck, keeps beating; a killed process or a lost
    machine stops. `stopped()` watches every counter once a collective has failed."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.done = threading.Event()
        threading.Thread(target=self.beat, args=(store.clone(),), name="musev_lite heartbeat", daemon=True).start()

    def beat(self, store) -> None:
        try:
            while not self.done.is_set() and store_answers():
                store.add(f"musev_lite/heartbeat/{self.rank}", 1)
                self.done.wait(HEARTBEAT_SECONDS)
        except (RuntimeError, OSError):  # the store went in between: stop beating
            pass

    def stopped(self) -> list[int] | None:
        """The other ranks whose counters did not move in LOST_AFTER heartbeats; None if the store does not
        answer (it lives on rank 0's machine, which may be the one lost)."""
        try:
            counts = [self.store.add(f"musev_lite/heartbeat/{r}", 0) for r in range(self.world)]
            time.sleep(LOST_AFTER * HEARTBEAT_SECONDS)
            now = [self.store.add(f"musev_lite/heartbeat/{r}", 0) for r in range(self.world)] if store_answers() else None
        except (RuntimeError, OSError):
            return None
        return None if now is None else [r for r in range(self.world) if r != self.rank and now[r] == counts[r]]


def store_answers() -> bool:
    """Whether the rendezvous store's address takes a connection. Asked before the store is used once the
    ranks have started: a store operation on a lost connection prints a C++ stack trace on stderr."""
    try:
        socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), HEARTBEAT_SECONDS).close()
        return True
    except (OSError, KeyError, ValueError):
        return False


HEARTBEAT: Heartbeat | None = None  # this process's, from `init` to `shutdown`


def assign_windows(windows: list[list[int]], ranks: int) -> list[list[int]]:
    """Which windows (indices into `windows`) each rank denoises: every window exactly once, the frames
    per rank as even as the windows allow, and a pure function of its arguments, so every rank computes
    the same split. Longest window first, each to the rank with the fewest frames so far (ties: the
    lower rank); no rank ends more than one window's length above another. Each rank's list is in
    window order."""
    return balance([len(window) for window in windows], ranks)


def balance(sizes: list[int], ranks: int) -> list[list[int]]:
    """Items of these sizes (indices into `sizes`) over `ranks`: largest first, each to the rank with the
    least so far (ties: the lower rank). Every item exactly once, each rank's list in item order."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    load, mine = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        mine[rank].append(i)
        load[rank] += sizes[i]
    return [sorted(indices) for indices in mine]


def assign_tasks(work: list[int], ranks: int) -> list[tuple[int, ...]]:
    """Which ranks run each task of a task file, given each task's estimated work (frames x steps): a
    pure function of its arguments, so every rank computes the same assignment.
    At least as many tasks as ranks: each task on one rank, balanced by work as `balance` does (no rank
    ends more than one task's work above another). Fewer: every rank runs one task, each task on a
    contiguous block of ranks that share its windows; the spare ranks go one by one to the task with the
    most work per rank (ties: the earlier task)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if len(work) >= ranks or not work:
        owner = {task: rank for rank, tasks in enumerate(balance(work, ranks)) for task in tasks}
        return [(owner[task],) for task in range(len(work))]
    counts = [1] * len(work)
    for _ in range(ranks - len(work)):
        task = max(range(len(work)), key=lambda t: (work[t] / counts[t], -t))
        counts[task] += 1
    starts = [sum(counts[:t]) for t in range(len(work))]
    return [tuple(range(start, start + count)) for start, count in zip(starts, counts)]


def agreed(ranks: Ranks | None, work, what: str) -> list:
    """`work()` on every rank, each rank's result in rank order (one process: its own, in a list). Under
    torchrun a ValueError on any rank is raised on all of them (the lowest rank's message), so that no rank
    goes on with what another refused, nor waits for it."""
    try:
        result, error = work(), None
    except ValueError as err:
        if ranks is None:
            raise
        result, error = None, str(err)
    if ranks is None:
        return [result]
    results = ranks.all_gather((result, error), what)
    errors = [error for _, error in results if error is not None]
    if errors:
        raise DistributedConfigError(errors[0])
    return [result for result, _ in results]


def ranks_label(members: tuple[int, ...]) -> str:
    """"rank 2", or "ranks 0-3" for a block."""
    return f"rank {members[0]}" if len(members) == 1 else f"ranks {members[0]}-{members[-1]}"


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedConfigError(f"{TIMEOUT_VARIABLE}={value!r} must be a number of seconds > 0")
    return seconds


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group, and the few collectives musev_lite needs."""

    rank: int
    world: int
    timeout: float
    group: object = None  # a torch ProcessGroup of some of the ranks (`subgroup`); None: all of them

    @property
    def device(self) -> torch.device:
        """Where collective tensors live: the current GPU for NCCL, else the CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def windows(self, windows: list[list[int]]) -> list[list[int]]:
        """This rank's share of a step's windows."""
        return [windows[i] for i in assign_windows(windows, self.world)[self.rank]]

    def block(self, items: list) -> list:
        """This rank's contiguous block of `items`: concatenated in rank order they are `items` again."""
        size = -(-len(items) // self.world)
        return items[self.rank * size : (self.rank + 1) * size]

    def all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        """Sum `tensor` over the ranks, in place."""
        self._collective(what, lambda: dist.all_reduce(tensor, group=self.group))

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's seed, on every rank."""
        value = torch.tensor([seed], dtype=torch.int64, device=self.device)
        self._collective("sharing the seed", lambda: dist.broadcast(value, group=self.group, group_src=0))
        return int(value.item())

    def broadcast(self, obj, what: str):
        """Rank 0's `obj` (any picklable value; tensors on the CPU), on every rank."""
        box = [obj if self.rank == 0 else None]
        self._collective(what, lambda: dist.broadcast_object_list(box, group=self.group, group_src=0))
        return box[0]

    def all_gather(self, obj, what: str) -> list:
        """Every rank's `obj` (any picklable value), in rank order."""
        out = [None] * self.world
        self._collective(what, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def subgroup(self, members: tuple[int, ...]) -> Ranks | None:
        """The ranks `members` (of the whole group) as a group of their own: this rank's place in it, or
        None if it is not one of them. Every rank of the whole group must call this, in the same order."""
        group = self._collective(f"making a group of ranks {members[0]}-{members[-1]}", lambda: dist.new_group(
            list(members), timeout=timedelta(seconds=self.timeout)))
        return Ranks(members.index(self.rank), len(members), self.timeout, group) if self.rank in members else None

    def _collective(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as err:  # gloo and NCCL report a lost peer or a timeout as RuntimeError (DistError)
            raise RankLostError(f"rank {self.rank} of {self.world}: {what} failed ({error_detail(err)}): "
                                f"{lost_ranks(self.timeout)}") from None


def error_detail(err: Exception) -> str:
    """The first sentence of a collective's error, without gloo's [source file:line] in front."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0].rstrip(".")


def lost_ranks(timeout: float) -> str:
    """Which rank is lost, as the heartbeats say (`Heartbeat.stopped`), and how long a rank waits."""
    wait = f"ranks wait {TIMEOUT_VARIABLE} = {timeout:g} s for a silent one"
    stopped = None if HEARTBEAT is None or not store_answers() else HEARTBEAT.stopped()
    if stopped:
        return (f"lost rank{'s' * (len(stopped) > 1)} {', '.join(map(str, stopped))}, whose heartbeat stopped: the "
                f"process or its machine is gone ({wait})")
    if stopped == []:
        return (f"every rank's heartbeat goes on, so one is stuck or slower than {timeout:g} s: set {TIMEOUT_VARIABLE} "
                "to wait longer")
    if HEARTBEAT is not None:
        return (f"lost rank 0's process or machine ({os.environ['MASTER_ADDR']}): the rendezvous store there does not "
                f"answer ({wait})")
    return f"another rank died or did not answer within {timeout:g} s (set {TIMEOUT_VARIABLE} to wait longer)"


def current() -> Ranks | None:
    """The ranks this process shares its work with: inside `sharing(...)` the ranks given, else those of the
    initialised default process group; None without one (or with one rank)."""
    if (shared := SHARING.get()) is not _WORLD:
        return shared
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size(), timeout_seconds())


@contextmanager
def sharing(ranks: Ranks | None) -> Iterator[None]:
    """Inside: `current()` is `ranks` (None: this process works alone, as for a task it runs by itself)."""
    token = SHARING.set(ranks)
    try:
        yield
    finally:
        SHARING.reset(token)


def launched() -> bool:
    """True in a process torchrun started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def reports() -> bool:
    """True where a mistake in the configuration is printed: in one process, or under torchrun on the first
    rank of each node (LOCAL_RANK 0). Every rank checks the same configuration, so one line per node
    says it, not one per rank; each node's own files (weights, inputs) are checked on that node."""
    return not launched() or os.environ.get("LOCAL_RANK", "0") == "0"


def is_main() -> bool:
    """True on rank 0, or when not distributed: the process that prints and writes. Inside `sharing(...)`,
    rank 0 of the ranks given (or this process, alone)."""
    if (shared := SHARING.get()) is not _WORLD:
        return shared is None or shared.rank == 0
    return int(os.environ.get("RANK", "0")) == 0 if not dist.is_initialized() else dist.get_rank() == 0


def rank_device(device: str) -> str:
    """Under torchrun, a bare "cuda" becomes this rank's GPU, cuda:LOCAL_RANK; otherwise `device` as given."""
    if launched() and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init(device: str) -> Ranks | None:
    """Join the process group torchrun set up (NCCL for CUDA devices, gloo for the CPU); None when not
    launched by torchrun. The ranks wait JOIN_TIMEOUT seconds for each other to start; collectives give
    up after MUSEV_LITE_DIST_TIMEOUT seconds (default 600). Starts this rank's `Heartbeat`."""
    global HEARTBEAT
    if not launched():
        return None
    check_launch()
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise DistributedConfigError(f"model.device = {device!r}: a run over several ranks needs \"cpu\" (gloo) or "
                                     "\"cuda\" (NCCL); launch without torchrun for this device")
    timeout = timeout_seconds()
    join = min(timeout, JOIN_TIMEOUT)
    if kind == "cuda":
        torch.cuda.set_device(torch.device(rank_device(device)))
    try:  # the rendezvous store waits `join` seconds for every rank; the collectives, `timeout`
        store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=join)))
        store.set_timeout(timedelta(seconds=timeout))
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        HEARTBEAT = Heartbeat(store, rank, world)
    except RuntimeError as err:  # torch's DistStoreError / DistNetworkError
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise RankLostError(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: could not join the other ranks "
                            f"at {where} within {join:g} s; are they all started? "
                            f"({str(err).strip().splitlines()[0]})") from None
    return current()


def check_launch() -> None:
    """The environment torchrun sets, all there and consistent; a DistributedConfigError saying what is
    missing otherwise (e.g. WORLD_SIZE left in the environment of a run started without torchrun)."""
    missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
    if missing:
        raise DistributedConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a run over several ranks, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun (it sets "
            f"{', '.join(LAUNCH_VARIABLES)} for every rank), or unset WORLD_SIZE to run in one process")
    numbers = ("RANK", "WORLD_SIZE", "MASTER_PORT")
    try:
        rank, world, port = (int(os.environ[name]) for name in numbers)
    except ValueError:
        got = ", ".join(f"{name}={os.environ[name]!r}" for name in numbers)
        raise DistributedConfigError(f"RANK, WORLD_SIZE and MASTER_PORT must be whole numbers; got {got}") from None
    if not 0 <= rank < world or not 0 < port < 65536:
        raise DistributedConfigError(f"RANK={rank} must be from 0 to WORLD_SIZE - 1 = {world - 1}, and "
                                     f"MASTER_PORT={port} a port from 1 to 65535")


def shutdown() -> None:
    global HEARTBEAT
    if HEARTBEAT is not None:
        HEARTBEAT.done.set()
        HEARTBEAT = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

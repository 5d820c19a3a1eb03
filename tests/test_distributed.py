"""One video over several ranks (musev_lite/distributed.py): the window split, and 2-process gloo runs
(torchrun, or processes started by hand with torchrun's environment variables) against one process.

The split runs the same UNet calls as one process and adds each frame's predictions over the ranks;
with at most two windows on a frame the sum does not depend on the order, so the latents and frames are
bitwise equal when both sides use one thread (a + b is b + a in IEEE arithmetic; at another thread count
the kernels round differently). Mistakes and lost ranks end a run with one line. A task file's tasks are
shared out whole (`assign_tasks`) to the same bytes; a checkpoint saved under torchrun resumes on 1 or 2 ranks.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import REPO, interrupt_when, max_abs_error, reduction_depth, rounding_tolerance
from distributed_worker import CASES, FAST, run_case
from musev_lite import distributed
from musev_lite.denoise import context_windows
from musev_lite.pipeline import MuseVPipeline

pytestmark = pytest.mark.filterwarnings("ignore:prompt truncated")
WORKER = str(REPO / "tests/distributed_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def frames_of(windows, indices):
    return sum(len(windows[i]) for i in indices)


@given(st.lists(st.integers(1, 16), max_size=12), st.integers(1, 5))
def test_assign_windows_every_window_once_and_balanced(lengths, ranks):
    windows = [list(range(n)) for n in lengths]
    split = distributed.assign_windows(windows, ranks)
    assert len(split) == ranks
    assert sorted(i for mine in split for i in mine) == list(range(len(windows)))  # every window exactly once
    assert all(mine == sorted(mine) for mine in split)  # in window order
    loads = [frames_of(windows, mine) for mine in split]
    assert max(loads) - min(loads) <= max(lengths, default=0)  # no rank a window's length above another
    assert distributed.assign_windows(windows, ranks) == split  # deterministic


def test_assign_windows_by_frames():
    windows = context_windows("uniform_v2", 41, 12, 4)  # 12, 12, 12, 12, 9 frames
    assert [len(w) for w in windows] == [12, 12, 12, 12, 9]
    assert distributed.assign_windows(windows, 2) == [[0, 2, 4], [1, 3]]  # 33 and 24 frames: the best split
    assert distributed.assign_windows(windows, 3) == [[0, 3], [1, 4], [2]]  # 24, 21, 12
    assert distributed.assign_windows(windows[:1], 2) == [[0], []]  # more ranks than windows: some idle
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        distributed.assign_windows(windows, 0)


@given(st.lists(st.integers(0, 100), max_size=12), st.integers(1, 6))
def test_assign_tasks_every_task_and_every_rank(work, ranks):
    """Whole tasks when there are at least as many as ranks, balanced by work; fewer: every rank in one
    task's contiguous block, each task at least one rank."""
    members = distributed.assign_tasks(work, ranks)
    assert len(members) == len(work) and distributed.assign_tasks(work, ranks) == members  # deterministic
    assert all(m and list(m) == list(range(m[0], m[-1] + 1)) for m in members)  # contiguous, not empty
    if len(work) >= ranks or not work:
        assert all(len(m) == 1 for m in members)
        loads = [sum(w for w, m in zip(work, members) if m == (r,)) for r in range(ranks)]
        assert max(loads) - min(loads) <= max(work, default=0)  # no rank a task's work above another
    else:
        assert sorted(r for m in members for r in m) == list(range(ranks))  # every rank, once


def test_assign_tasks_by_work():
    assert distributed.assign_tasks([10, 10, 10, 10], 2) == [(0,), (1,), (0,), (1,)]
    assert distributed.assign_tasks([5, 30, 10], 2) == [(1,), (0,), (1,)]  # 30 against 15
    assert distributed.assign_tasks([10, 30], 5) == [(0, 1), (2, 3, 4)]  # spare ranks to the most work per rank
    assert distributed.assign_tasks([10], 3) == [(0, 1, 2)] and distributed.assign_tasks([], 2) == []
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        distributed.assign_tasks([1], 0)


def test_block_keeps_the_order():
    items = list(range(7))
    for world in (1, 2, 3, 8):
        parts = [distributed.Ranks(rank, world, 1.0).block(items) for rank in range(world)]
        assert sum(parts, []) == items


def test_not_launched_is_not_distributed():
    assert not distributed.launched() and distributed.current() is None and distributed.init("cpu") is None


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank runs: the same kernels, the same rounding
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_ranks_make_the_video_one_process_makes(tmp_path, one_thread):
    """i2v, t2i2v and two shots, each rank returning all frames; and window_batch 2, where a rank stacks
    other windows in a call than one process does (here windows 0 and 2 against 0 and 1), so the
    kernels round differently: equal to the rounding of each step through the UNet (conftest.rounding_tolerance),
    frames to 1 level."""
    subprocess.run(TORCHRUN + [WORKER, "cases", str(tmp_path)], check=True, timeout=300, capture_output=True)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    pipe = MuseVPipeline.demo(seed=0)
    for name in CASES:
        alone = run_case(pipe, name)
        batched = CASES[name].get("window_batch", 1) > 1
        tolerance = rounding_tolerance(alone.latents, FAST["steps"] * reduction_depth(pipe.unet)) if batched else 0.0
        for r, got in enumerate(ranks):
            assert max_abs_error(got[f"{name}.latents"], alone.latents, f"{name}, rank {r} of 2 vs 1 process") <= tolerance
            levels = np.abs(got[f"{name}.frames"].numpy().astype(int) - alone.frames).max()
            assert levels <= (1 if batched else 0), f"{name}: rank {r}'s frames differ by {levels} levels"


TINY_CONFIG = """
[model]
preset = "tiny"
[input]
image = "{image}"
prompt = "a face"
[generation]
num_frames = 9
steps = 2
context_frames = 4
context_overlap = 1
height = 64
width = 64
[output]
formats = ["mp4", "png"]
contact_sheet = false
"""


def tiny_config(tmp_path) -> Path:
    config = tmp_path / "video.toml"
    config.write_text(TINY_CONFIG.format(image=REPO / "examples/face.png"))
    return config


def plain_env(**variables) -> dict:
    """This environment without torchrun's variables (a test may run under a launcher), plus `variables`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "OMP_NUM_THREADS")}
    return dict(env, **variables)


@pytest.mark.slow
def test_torchrun_and_one_process_at_one_thread_write_the_same_bytes(tmp_path):
    """The README's promise: the same video for any number of ranks, bitwise at the same thread count per
    process. torchrun starts each rank with OMP_NUM_THREADS=1, so one process with OMP_NUM_THREADS=1 writes
    the same mp4 and PNG bytes. Rank 0 alone writes and prints."""
    config = tiny_config(tmp_path)
    two = subprocess.run(TORCHRUN + ["-m", "musev_lite.run", str(config), "--set", f"output.dir='{tmp_path / 'two'}'"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=plain_env())
    assert two.returncode == 0, two.stderr
    written = two.stdout.split()
    assert len(written) == 3 and all(p.startswith(str(tmp_path / "two")) for p in written)  # printed once: rank 0
    stem = Path(written[0]).stem
    seed = int(stem.rsplit("-", 1)[1])  # no seed set: rank 0 drew it and the other rank took it
    one = subprocess.run([sys.executable, "-m", "musev_lite.run", str(config), "--set", f"output.dir='{tmp_path / 'one'}'",
                          "--set", f"generation.seed={seed}"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=plain_env(OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr
    names = [f"{stem}.mp4"] + [f"{stem}_frames/{n:05d}.png" for n in range(10)]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"{stem}.json", f"{stem}.mp4", f"{stem}_frames"]
    for folder in ("one", "two"):
        assert json.loads((tmp_path / folder / f"{stem}.json").read_text())["threads"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("mistake, message", [
    ("generation.stepz=2", "error: unknown key generation.stepz"),  # found before the ranks join
    ("model.preset=musev_referencenet", "error: model.weights_dir 'weights/musev_referencenet' lacks"),  # after
])
def test_a_mistake_under_torchrun_is_one_line_and_exit_code_2(tmp_path, mistake, message):
    """Every rank finds it; only rank 0 (the first rank of the node) prints it, and exits with 2, as torchrun's
    report says: the other rank waits before it exits with 2 (command.SILENT_RANK_DELAY), since torchrun stops
    every rank once one exits. torchrun itself exits 1 when any rank fails, whatever its code."""
    done = subprocess.run(TORCHRUN + ["-m", "musev_lite.run", str(tiny_config(tmp_path)), "--set", mistake,
                                      "--set", f"output.dir='{tmp_path / 'out'}'"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=plain_env())
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 2 ", done.stderr), done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_distributed_variables_without_torchrun_are_one_line_at_once(tmp_path):
    """WORLD_SIZE left in the environment of a plain run: exit code 2 and what is missing, not a wait for
    the timeout (600 s by default; the subprocess timeout would end the test long before)."""
    done = subprocess.run([sys.executable, "-m", "musev_lite.run", str(tiny_config(tmp_path)),
                           "--set", f"output.dir='{tmp_path / 'out'}'"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=plain_env(WORLD_SIZE="2", RANK="0"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: WORLD_SIZE=2 asks for a run over several ranks, but MASTER_ADDR, MASTER_PORT are not set: launch "
        "with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for every rank), or unset WORLD_SIZE to "
        "run in one process"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_rank_alone_gives_up_joining(tmp_path):
    """Rank 0 of 2 with an address but no other rank: one line after the join timeout, exit code 1 (a rank
    lost), nothing written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "musev_lite.run", str(tiny_config(tmp_path)),
                           "--set", f"output.dir='{tmp_path / 'out'}'"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=plain_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                                      MASTER_PORT=str(port), **{distributed.TIMEOUT_VARIABLE: "3"}))
    assert done.returncode == 1, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: rank 0 of 2: could not join the other ranks at 127.0.0.1:{port} within 3 s")
    assert not (tmp_path / "out").exists()


def start_ranks(mode: str, out) -> list[subprocess.Popen]:
    """Two ranks started by hand, as torchrun would start them, with a 5 s timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", **{distributed.TIMEOUT_VARIABLE: "5"})
        procs.append(subprocess.Popen([sys.executable, WORKER, mode, str(out)], env=env, stderr=subprocess.PIPE,
                                      text=True))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("mode, says", [
    ("die", "lost rank 1, whose heartbeat stopped: the process or its machine is gone (ranks wait "
            "MUSEV_LITE_DIST_TIMEOUT = 5 s for a silent one)"),
    ("hang", "every rank's heartbeat goes on, so one is stuck or slower than 5 s: set MUSEV_LITE_DIST_TIMEOUT to wait "
             "longer"),  # a hung rank's heartbeat thread still beats
])
def test_a_lost_rank_is_a_clear_error_not_a_hang(tmp_path, mode, says):
    """Rank 1 exits at once, or hangs: rank 0 gives up on it with one line that says which (`Heartbeat`)."""
    procs = start_ranks(mode, tmp_path)
    started = time.monotonic()
    try:
        stderr = procs[0].communicate(timeout=120)[1]
    finally:
        procs[1].kill()
        procs[1].wait()
    print(f"{mode}: rank 0 gave up after {time.monotonic() - started:.1f} s: {stderr.strip()[-300:]}")
    assert procs[0].returncode == 1
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: rank 0 of 2: denoising step 1/2 failed (") and line.endswith(f"): {says}"), line
    assert "Traceback" not in stderr


TASKS = """
[[task]]
name = "a"
[[task]]
name = "b"
[task.generation]
num_frames = 13
seed = 4
[[task]]
name = "c"
[task.generation]
seed = 5
"""


def frames_bytes(folder: Path, stem: str) -> dict:
    """The bytes of a run's mp4 and PNG frames, by name."""
    files = [folder / f"{stem}.mp4"] + sorted((folder / f"{stem}_frames").iterdir())
    return {f.name: f.read_bytes() for f in files}


@pytest.mark.slow
def test_tasks_over_two_ranks_write_the_bytes_of_one_process(tmp_path):
    """3 tasks on 2 ranks: whole tasks per rank (a and c on one, the longer b on the other), each rank writing
    its own; rank 0 prints the end table of all. 1 task on 2 ranks: they share its windows. Both write
    the bytes one process writes running the tasks in order at one thread."""
    config = tmp_path / "tasks.toml"
    config.write_text(TINY_CONFIG.format(image=REPO / "examples/face.png").replace("steps = 2", "steps = 2\nseed = 3")
                      + TASKS)
    one = subprocess.run([sys.executable, "-m", "musev_lite.run", str(config), "--set", f"output.dir='{tmp_path / 'one'}'"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=plain_env(OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(TORCHRUN + ["-m", "musev_lite.run", str(config), "--set", f"output.dir='{tmp_path / 'two'}'"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=plain_env())
    assert two.returncode == 0, two.stderr
    assert "task 2/3 (b): starting on rank 0, seed 4" in two.stderr  # 14 frames: the most work
    assert "task 1/3 (a): starting on rank 1, seed 3" in two.stderr and "task 3/3 (c): starting on rank 1" in two.stderr
    assert two.stderr.count("tasks: 3 done") == 1 and "  2/3  b  done" in two.stderr
    assert sorted(Path(p).name for p in two.stdout.split()) == sorted(Path(p).name for p in one.stdout.split())
    for stem in ("a-3", "b-4", "c-5"):
        assert frames_bytes(tmp_path / "two", stem) == frames_bytes(tmp_path / "one", stem), stem
    config.write_text(config.read_text().split('[[task]]\nname = "b"')[0])  # task a alone
    shared = subprocess.run(TORCHRUN + ["-m", "musev_lite.run", str(config), "--set", f"output.dir='{tmp_path / 'shared'}'"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=plain_env())
    assert shared.returncode == 0, shared.stderr
    assert "task 1/1 (a): starting on ranks 0-1, seed 3" in shared.stderr and "tasks: 1 done" in shared.stderr
    assert frames_bytes(tmp_path / "shared", "a-3") == frames_bytes(tmp_path / "one", "a-3")


@pytest.mark.slow
def test_a_bad_task_under_torchrun_is_one_line_before_any_task_starts(tmp_path):
    """A mistake in the last task's inputs: every rank finds it before a task starts, rank 0 alone prints it."""
    config = tmp_path / "tasks.toml"
    config.write_text(TINY_CONFIG.format(image=REPO / "examples/face.png") + TASKS
                      + '[task.input]\nimage = "nope.png"\n')
    done = subprocess.run(TORCHRUN + ["-m", "musev_lite.run", str(config), "--set", f"output.dir='{tmp_path / 'out'}'"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=plain_env())
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: task 3/3 (c): input.image: image"), done.stderr
    assert "starting" not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_checkpoint_under_torchrun_resumes_on_one_rank_or_two(tmp_path):
    """A 2-rank run with output.checkpoint, killed (SIGKILL) mid-shot 2: rank 0 saved the global state, so
    the same command with --resume continues on 1 rank or on 2 to the bytes of a run never stopped."""
    config = tiny_config(tmp_path)
    args = ["-m", "musev_lite.run", str(config), "--set", "generation.n_batch=2", "--set", "generation.steps=4",
            "--set", "generation.seed=7", "--set", "output.checkpoint=true", "--set", "output.name=v"]
    killed = subprocess.Popen(TORCHRUN + args + ["--set", f"output.dir='{tmp_path / 'killed'}'"], cwd=tmp_path,
                              env=plain_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in killed.stderr:
        seen.append(line)
        if "shot 2/2  step 2/4" in line:  # both ranks (torchrun starts each in a session of its own), at once
            for pid in Path(f"/proc/{killed.pid}/task/{killed.pid}/children").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
            break
    killed.communicate(timeout=120)  # torchrun sees its ranks gone, reaps them and exits
    assert (tmp_path / "killed" / "v.checkpoint" / "state.safetensors").exists(), "".join(seen)
    for launcher, folder in (([sys.executable], "one"), (TORCHRUN, "two")):
        shutil.copytree(tmp_path / "killed", tmp_path / folder)
        done = subprocess.run(launcher + args + ["--resume", "--set", f"output.dir='{tmp_path / folder}'"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env=plain_env(OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr
        assert "resuming v.checkpoint: 1 of 2 shots done, shot 2/2 at step" in done.stderr
        assert not (tmp_path / folder / "v.checkpoint").exists()
    straight = subprocess.run([sys.executable] + args + ["--set", f"output.dir='{tmp_path / 'straight'}'"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path, env=plain_env(OMP_NUM_THREADS="1"))
    assert straight.returncode == 0, straight.stderr
    expected = frames_bytes(tmp_path / "straight", "v")
    assert len(expected) == 1 + 19  # the mp4 and every frame: the image and 2 shots of 9
    for folder in ("one", "two"):
        assert frames_bytes(tmp_path / folder, "v") == expected, folder


@pytest.mark.slow
def test_two_nodes_on_loopback_write_the_bytes_of_one_process(tmp_path):
    """The README's several-machines command, two torchrun agents on 127.0.0.1 as nodes 0 and 1 with one
    process each: the video one process writes at one thread, written once (by node 0's rank 0)."""
    config = tiny_config(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_args = ["-m", "musev_lite.run", str(config), "--set", "generation.seed=2"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--nproc-per-node", "1"] + run_args
                              + ["--set", f"output.dir='{tmp_path / 'nodes'}'"], cwd=tmp_path,
                              env=plain_env(OMP_NUM_THREADS="1"),  # torchrun sets it only for 2+ processes a node
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        done = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], done[0][1] + done[1][1]
    assert "(2 UNet calls/step)" in done[0][1] and done[1][0] == ""  # 3 windows: 2 on rank 0, 1 on rank 1
    one = subprocess.run([sys.executable] + run_args + ["--set", f"output.dir='{tmp_path / 'one'}'"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=plain_env(OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr
    assert frames_bytes(tmp_path / "nodes", "video-2") == frames_bytes(tmp_path / "one", "video-2")


@pytest.mark.slow
def test_an_interrupted_task_file_under_torchrun_resumes_in_one_process(tmp_path):
    """Ctrl-C on a 2-rank task run with output.checkpoint: each rank keeps the checkpoint of the task it was
    running and says so (rank 1 with its rank in front); --resume in one process continues both and runs
    the last, to the bytes of a run never stopped."""
    config = tmp_path / "tasks.toml"
    config.write_text(TINY_CONFIG.format(image=REPO / "examples/face.png").replace("steps = 2", "steps = 6\nseed = 3")
                      + TASKS)
    args = ["-m", "musev_lite.run", str(config), "--set", "output.checkpoint=true", "--set", f"output.dir='{tmp_path / 'out'}'"]
    process = subprocess.Popen(TORCHRUN + args, cwd=tmp_path, env=plain_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    code, _, err = interrupt_when(process, "task 2/3  shot 1/1  step 3/6", signal.SIGINT)
    assert code != 0 and sorted(p.name for p in (tmp_path / "out").glob("*.checkpoint")) == ["a-3.checkpoint",
                                                                                             "b-4.checkpoint"], err
    assert "rank 1: interrupted (SIGINT): a-3.mp4, a-3_frames, a-3.json were not written; kept a-3.checkpoint" in err
    assert "\ninterrupted (SIGINT): b-4.mp4, b-4_frames, b-4.json were not written; kept b-4.checkpoint" in err
    done = subprocess.run([sys.executable] + args + ["--resume"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=plain_env(OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert "task 1/3 (a): resuming, seed 3" in done.stderr and "tasks: 3 done" in done.stderr
    straight = subprocess.run([sys.executable] + args[:3] + ["--set", f"output.dir='{tmp_path / 'straight'}'"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path, env=plain_env(OMP_NUM_THREADS="1"))
    assert straight.returncode == 0, straight.stderr
    for stem in ("a-3", "b-4", "c-5"):
        assert frames_bytes(tmp_path / "out", stem) == frames_bytes(tmp_path / "straight", stem), stem


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent's whole node: its ranks (each in a session of its own) and the agent."""
    ranks = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    for pid in ranks + [str(agent.pid)]:
        os.killpg(int(pid), signal.SIGKILL)


@pytest.mark.slow
def test_a_lost_node_ends_the_run_with_one_line_and_resume_continues(tmp_path):
    """Two torchrun agents on 127.0.0.1 as nodes 0 and 1; node 1 (agent and rank) SIGKILLed while the video
    is denoised. Node 0's rank prints one `error:` line naming the lost rank (its heartbeat stopped), the
    timeout variable and the resume command, with no traceback (torchrun's agent adds its own report, with
    torchrun's traceback, on its stderr: `--tee` keeps the rank's stderr apart in a file), and node 0 ends,
    torchrun exiting 1, within MUSEV_LITE_DIST_TIMEOUT (gloo sees the closed connection at once; naming the
    rank takes LOST_AFTER heartbeats). The command of the line continues in one process to the bytes of a
    run never stopped."""
    config, timeout = tiny_config(tmp_path), 20
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["-m", "musev_lite.run", str(config), "--set", "generation.steps=6", "--set", "generation.seed=7",
            "--set", "output.checkpoint=true", "--set", "output.name=v"]
    env = plain_env(OMP_NUM_THREADS="1", **{distributed.TIMEOUT_VARIABLE: str(timeout)})
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--nproc-per-node", "1",
                               "--log-dir", str(tmp_path / f"logs{r}"), "--tee", "2"]  # the rank's own stderr, apart
                              + args + ["--set", f"output.dir='{tmp_path / 'out'}'"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in range(2)]
    try:
        seen = []
        for line in nodes[0].stderr:
            seen.append(line)
            if "shot 1/1  step 1/6" in line:  # denoising has started on both nodes
                kill_node(nodes[1])
                killed = time.monotonic()
                break
        else:
            pytest.fail("node 0 ended before denoising:\n" + "".join(seen))
        agent_err = "".join(seen) + nodes[0].communicate(timeout=timeout + 60)[1]
        ended = time.monotonic() - killed
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)
            node.wait()
    [log] = (tmp_path / "logs0").rglob("0/stderr.log")  # node 0's rank, as it wrote its stderr
    rank_err = log.read_text()
    print(f"node 0 ended {ended:.1f} s after the kill, torchrun exit {nodes[0].returncode}\n"
          f"--- rank 0's stderr:\n{rank_err}--- the agent's stderr:\n{agent_err}")
    assert nodes[0].returncode == 1  # torchrun: a rank failed
    errors = [line for line in rank_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, rank_err
    assert errors[0].startswith("error: rank 0 of 2: denoising step ") and "lost rank 1, whose heartbeat stopped" \
        in errors[0] and f"{distributed.TIMEOUT_VARIABLE} = {timeout} s" in errors[0], errors[0]
    assert "Traceback" not in rank_err
    assert [line for line in agent_err.splitlines() if "error:" in line] == [f"[default0]:{errors[0]}"]  # tee'd
    assert agent_err.count("Traceback") == 1 and "ChildFailedError" in agent_err  # torchrun's own report: exit 1
    assert ended < timeout + 15
    assert (tmp_path / "out" / "v.checkpoint" / "state.safetensors").exists()
    command = errors[0].split("; v.checkpoint keeps the last saved step: continue with: ")[1]  # the line's own
    assert shlex.split(command) == ["python"] + args + ["--set", f"output.dir='{tmp_path / 'out'}'", "--resume"]
    resumed = subprocess.run([sys.executable] + shlex.split(command)[1:], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env=plain_env(OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming v.checkpoint: 0 of 1 shots done, shot 1/1 at step" in resumed.stderr
    straight = subprocess.run([sys.executable] + args + ["--set", f"output.dir='{tmp_path / 'straight'}'"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path, env=plain_env(OMP_NUM_THREADS="1"))
    assert straight.returncode == 0, straight.stderr
    assert frames_bytes(tmp_path / "out", "v") == frames_bytes(tmp_path / "straight", "v")

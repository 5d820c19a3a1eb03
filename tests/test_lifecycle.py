"""A run's outputs appear as one set or not at all: interrupts (SIGINT, SIGTERM) at every stage leave
no output and no temporary file, existing outputs are kept unless output.overwrite, a second run of
the same name is locked out, and temporaries a killed run left are cleaned; paths in a config are
relative to its folder; the video's size is chosen from the image and said; a size the machine cannot
hold is refused before generating."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import REPO, interrupt_when, sets
from musev_lite import memory, outputs, run
from musev_lite.pipeline import MuseVPipeline
from musev_lite.plan import fit_video_size, make_plan
from musev_lite.settings import ConfigError, GenerationConfig

DEMO = REPO / "examples/demo.toml"
TINY = ["generation.steps=1", "generation.num_frames=3", "generation.context_frames=4", "generation.context_overlap=2",
        "output.name=v"]


def run_main(out, *overrides, config=DEMO):
    return run.main([str(config)] + sets(TINY + [f"output.dir={out}"] + list(overrides)))


def everything_in(folder):
    """Every entry of `folder`, hidden ones included (empty if it does not exist)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------
# Interrupts, in a real process


def start(out, *overrides, cwd=REPO):
    args = [sys.executable, "-m", "musev_lite.run", str(DEMO)] + sets(TINY + [f"output.dir={out}"] + list(overrides))
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # tiny tensors: threads only contend


GENERATING = ("step 1/40", ["generation.steps=40"])  # 39 steps are left
# the mp4 and the PNG frames were streamed during generation; the GIF and WebP of 41 frames are left to write
WRITING = ("writing v.gif", ["generation.num_frames=40", "generation.context_frames=12", "generation.context_overlap=0",
                                'output.formats=["png", "gif", "webp", "mp4"]'])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("stage", [GENERATING, WRITING], ids=["generating", "writing"])
def test_interrupt_leaves_nothing(tmp_path, signum, stage):
    out = tmp_path / "out"
    marker, extra = stage
    code, stdout, err = interrupt_when(start(out, *extra), marker, signum)
    assert code == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({signal.Signals(signum).name}): nothing was written (v") and \
        "no temporary file is left" in last, err
    assert "Traceback" not in err and stdout == ""
    assert everything_in(out) == []  # no output, no staging folder, no lock


def test_interrupt_while_starting_is_one_line(tmp_path):
    """Ctrl-C while torch is imported (the process has mapped libtorch): one line, exit 130."""
    process = start(tmp_path / "out")
    maps = f"/proc/{process.pid}/maps"
    if not os.path.exists(maps):
        process.kill()
        pytest.skip("needs /proc to see when torch is being imported")
    deadline = time.monotonic() + 120
    while "libtorch" not in open(maps).read():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err == "interrupted (SIGINT) while starting: nothing was written\n", err
    assert everything_in(tmp_path / "out") == []


def test_signal_while_writing_in_process(tmp_path, monkeypatch, capsys):
    """SIGTERM raised inside the GIF writer, after the mp4 and the PNG frames were written: exit 143, and
    neither they nor their temporaries are left; an output of the same name from before is unchanged."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.mp4").write_bytes(b"an older video")
    writer = outputs.write_animation

    def interrupted_writer(path, frames, fps):
        writer(path, frames[:2], fps)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(outputs, "write_animation", interrupted_writer)
    code = run_main(out, 'output.formats=["mp4", "png", "gif"]', "output.overwrite=true")
    err = capsys.readouterr().err
    assert code == 143, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted (SIGTERM): nothing was written (v.mp4, v_frames, v.gif, v_sheet.png, v.json in {out} were not) "
        "and no temporary file is left; the existing outputs of that name are unchanged")
    assert everything_in(out) == ["v.mp4"] and (out / "v.mp4").read_bytes() == b"an older video"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main gave the handler back


# ---------------------------------------------------------------------------------------------
# Existing outputs, locks, stale temporaries


@pytest.mark.slow
def test_existing_output_is_refused_then_overwritten_with_the_key(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(out, "generation.seed=1") == 0
    first = (out / "v.json").read_text()
    capsys.readouterr()
    assert run_main(out, "generation.seed=2") == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: {out / 'v.mp4'} already exists (and 2 more of this run's outputs); set "
                                "output.overwrite = true to replace it, or choose another output.name or output.dir"]
    assert (out / "v.json").read_text() == first and everything_in(out) == ["v.json", "v.mp4", "v_sheet.png"]
    assert run_main(out, "generation.seed=2", "output.overwrite=true") == 0
    assert json.loads((out / "v.json").read_text())["seed"] == 2
    assert everything_in(out) == ["v.json", "v.mp4", "v_sheet.png"]


def test_overwrite_replaces_a_frames_folder(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "v_frames").mkdir(parents=True)
    (out / "v_frames" / "99999.png").write_bytes(b"old")
    assert run_main(out, 'output.formats=["png"]', "output.contact_sheet=false", "output.overwrite=true") == 0
    assert everything_in(out) == ["v.json", "v_frames"]
    assert everything_in(out / "v_frames") == ["00000.png", "00001.png", "00002.png", "00003.png"]


def test_a_second_run_of_the_same_name_is_locked_out(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.lock").write_text(f"{os.getppid()}\n")  # a process that runs: this test's parent
    assert run_main(out) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [
        f"error: {out / 'v.lock'}: another run (pid {os.getppid()}) is writing outputs named 'v' in {out}; wait "
        "for it, or set another output.name (delete the lock file if no run is writing there)"]
    assert everything_in(out) == ["v.lock"]  # the other run's lock is left alone


def test_stale_lock_and_temporaries_of_a_killed_run_are_cleaned(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "v.lock").write_text(f"{dead.pid}\n")
    (out / f".v.{dead.pid}.tmp").mkdir()  # a staging folder
    (out / f".v.{dead.pid}.tmp" / "v.mp4").write_bytes(b"half")
    (out / ".v.k2j4_x9q.tmp.mp4").write_bytes(b"half")  # weights.atomic_path's naming
    (out / ".v_frames.abcdefgh.tmp").mkdir()
    others = [".v2.123.tmp", ".w.abcdefgh.tmp.mp4", ".v.tmp", "notes.txt"]  # not ours: kept
    for name in others:
        (out / name).write_text("keep")
    assert run_main(out) == 0
    err = capsys.readouterr().err
    assert f"note: took over {out / 'v.lock'}: its run (pid {dead.pid}) no longer runs" in err
    assert (f"note: removed temporaries an interrupted run left in {out}: .v.{dead.pid}.tmp, .v.k2j4_x9q.tmp.mp4, "
            ".v_frames.abcdefgh.tmp") in err
    assert everything_in(out) == sorted(others + ["v.json", "v.mp4", "v_sheet.png"])


# ---------------------------------------------------------------------------------------------
# Paths relative to the config file


@pytest.mark.slow
def test_demo_runs_from_another_folder(tmp_path):
    """examples/demo.toml names its image relative to itself; the outputs go to outputs/ in the working directory."""
    done = subprocess.run([sys.executable, "-m", "musev_lite.run", str(DEMO)] + sets(TINY), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["outputs/v.mp4", "outputs/v_sheet.png", "outputs/v.json"]
    assert everything_in(tmp_path) == ["outputs"] and everything_in(tmp_path / "outputs") == ["v.json", "v.mp4", "v_sheet.png"]


def test_missing_file_errors_say_what_a_path_is_relative_to(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "c.toml"
    config.write_text('[model]\npreset = "tiny"\n[input]\nimage = "pictures/face.png"\n')
    monkeypatch.chdir(tmp_path)
    assert run.main([str(config)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: input.image: image {folder / 'pictures/face.png'}: no such file (input.image = 'pictures/face.png' "
        f"is relative to the config file's folder, {folder})"]
    assert run.main([str(config), "--set", "input.image=face.png"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: input.image: image face.png: no such file (input.image = 'face.png' is given with --set, so it is "
        f"relative to the working directory, {tmp_path})"]
    config.write_text('[model]\npreset = "tiny"\n[[model.lora]]\npath = "style.safetensors"\n')
    assert run.main([str(config)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: model.lora[0].path: {folder / 'style.safetensors'}: no such file (model.lora[0].path = "
        f"'style.safetensors' is relative to the config file's folder, {folder})"]
    assert everything_in(tmp_path) == ["configs"]


# ---------------------------------------------------------------------------------------------
# Size policy and memory


@pytest.mark.parametrize("image, height, width, multiple, expected", [
    ((2500, 4000), 0, 0, 8, (320, 512)),  # a photo: long side 512, aspect kept
    ((4000, 2500), 0, 0, 64, (512, 320)),
    ((3000, 3000), 0, 0, 8, (512, 512)),
    ((1000, 700), 0, 0, 64, (512, 320)),  # 358.4 -> floored to 64
    ((128, 96), 0, 0, 8, (128, 96)),  # a small image is not scaled up
    ((2500, 4000), 320, 0, 8, (320, 512)),  # one side set: the other by the image's aspect
    ((2500, 4000), 0, 256, 8, (160, 256)),
    ((2500, 4000), 1024, 768, 8, (1024, 768)),  # both set: honoured
    (None, 0, 0, 8, (512, 320)),  # no image: MuseV's training size
    (None, 256, 0, 8, (256, 320)),
])
def test_size_policy(image, height, width, multiple, expected):
    assert fit_video_size(image, height, width, multiple) == expected


def test_too_small_a_size_is_refused():
    with pytest.raises(ConfigError, match=r"video size 8x0 \(width x height\) from the image's 10x5 is too small"):
        fit_video_size((5, 10), 0, 0, 8)


@pytest.mark.slow
def test_run_says_the_size_it_chose(tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (1000, 625), (90, 120, 150)).save(big)
    assert run_main(tmp_path / "out", f"input.image={big}", "generation.num_frames=1") == 0
    assert ("size: 320x512 (height x width) from the image's 625x1000 (set generation.height/width to choose)"
            in capsys.readouterr().err)
    assert json.loads((tmp_path / "out/v.json").read_text())["width"] == 512


def test_a_size_beyond_memory_is_refused_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: (50_000_000, "MemAvailable in /proc/meminfo"))
    steps = []
    monkeypatch.setattr(run, "ProgressPrinter", lambda total: steps.append)
    assert run_main(tmp_path / "out", "generation.height=512", "generation.width=512", "generation.num_frames=12") == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith("error: a 512x512 video of 1 x 12 frames needs about ")
    detail = line.split(" (", 1)[1].split(") but ", 1)[0]  # "UNet window call 0.1 GB, decoding 0.1 GB, ..."
    parts = [part.rsplit(" ", 2)[0] for part in detail.split(", ")]
    assert sorted(parts) == ["UNet window call", "decoding", "frames", "latents"], line
    assert "but 50 MB is available (MemAvailable in /proc/meminfo); " in line
    assert line.endswith(memory.FIXES[parts[0]]), line  # the fix for the largest part, which is listed first
    assert steps == [] and everything_in(tmp_path / "out") == []


def test_estimate_grows_with_what_it_should():
    pipe = MuseVPipeline.demo(seed=0)
    def estimate(**settings):
        plan = make_plan(GenerationConfig(height=256, width=256, **settings), None, None, None, None, pipe.controlnets)[0]
        return memory.estimate_memory(pipe, plan)

    base, longer, batched = estimate(num_frames=24), estimate(num_frames=48), estimate(num_frames=24, window_batch=2)
    assert longer["UNet window call"] == base["UNet window call"] and longer["latents"] > base["latents"]
    assert batched["UNet window call"] == 2 * base["UNet window call"]
    assert memory.available_memory(torch.device("cpu")) is None or memory.available_memory(torch.device("cpu"))[0] > 0


def test_out_of_memory_anywhere_is_one_error_line(tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(MuseVPipeline, "decode", exhausted)
    assert run_main(tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert error_lines(err) == ["error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); nothing was "
                                "written. Lower generation.height/width, num_frames, n_batch or window_batch, or free memory"]
    assert "Traceback" not in err and everything_in(tmp_path / "out") == []

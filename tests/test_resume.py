"""Long runs: with output.checkpoint a run killed at any point (SIGKILL mid-shot, Ctrl-C) continues with
`--resume` to the same video, byte for byte (mp4 and PNG frames), as a run that was never stopped; Ctrl-C
keeps the finished shots as NAME.partial.mp4 / NAME_frames.partial and says how to resume; a checkpoint
is only resumed with the settings that made it; the outputs are streamed shot by shot."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, interrupt_when, sets
from musev_lite import run, video_io
from musev_lite.video_io import read_video

DEMO = REPO / "examples/demo.toml"
# 3 shots of 3 frames, 3 steps each: 10 frames; mp4 and PNG frames
SHOTS = ["generation.steps=3", "generation.num_frames=3", "generation.n_batch=3", "generation.context_frames=4",
         "generation.context_overlap=2", 'output.formats=["mp4", "png"]', "output.name=v"]
MID_SHOT_2 = "shot 2/3  step 2/3"


def start(out, *overrides, resume=False):
    args = [sys.executable, "-m", "musev_lite.run", str(DEMO)] + sets(SHOTS + [f"output.dir={out}"] + list(overrides))
    return subprocess.Popen(args + ["--resume"] * resume, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def finish(process):
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return err


def outputs(folder):
    """The bytes of the mp4 and of every PNG frame, and what else is in the folder."""
    frames = sorted((folder / "v_frames").iterdir())
    return ((folder / "v.mp4").read_bytes(), [f.read_bytes() for f in frames],
            sorted(p.name for p in folder.iterdir()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    finish(start(out))
    return outputs(out)


@pytest.mark.slow
def test_killed_mid_shot_resumes_to_the_same_bytes(tmp_path, uninterrupted):
    out = tmp_path / "out"
    code, _, err = interrupt_when(start(out, "output.checkpoint=true"), MID_SHOT_2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    state = out / "v.checkpoint" / "state.safetensors"
    assert state.exists() and (out / "v.checkpoint" / "shot_00000.safetensors").exists()
    err = finish(start(out, resume=True))
    assert "resuming v.checkpoint: 1 of 3 shots done, shot 2/3 at step" in err, err
    assert "shot 1/3" not in err  # the finished shot is decoded again, not denoised
    mp4, frames, names = outputs(out)
    assert len(frames) == 10 and frames == uninterrupted[1]
    assert mp4 == uninterrupted[0]
    assert names == ["v.json", "v.mp4", "v_frames", "v_sheet.png"]  # checkpoint and lock gone


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_shots_and_says_how_to_resume(tmp_path, uninterrupted):
    out = tmp_path / "out"
    code, _, err = interrupt_when(start(out, "output.checkpoint=true"), MID_SHOT_2, signal.SIGINT)
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGINT): v.mp4, v_frames, v_sheet.png, v.json were not written; kept "
                           f"v.partial.mp4, v_frames.partial, v.checkpoint in {out}; continue with: python -m "
                           "musev_lite.run "), last
    assert sorted(p.name for p in out.iterdir()) == ["v.checkpoint", "v.partial.mp4", "v_frames.partial"]
    partial = read_video(out / "v.partial.mp4")  # plays: shot 1's frames (the condition frame and 3)
    assert len(partial.frames) == 4 and len(list((out / "v_frames.partial").iterdir())) == 4
    command = last.split("continue with: ")[1]
    assert command.endswith("--resume") and "generation.steps=3" in command

    err = finish(start(out, resume=True))
    mp4, frames, names = outputs(out)
    assert frames == uninterrupted[1] and mp4 == uninterrupted[0]
    assert names == ["v.json", "v.mp4", "v_frames", "v_sheet.png"]  # the partial outputs are replaced
    assert json.loads((out / "v.json").read_text())["frames"] == 10


@pytest.mark.slow
def test_a_checkpoint_resumes_only_with_its_settings(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = interrupt_when(start(out, "output.checkpoint=true"), "shot 1/3  step 2/3", signal.SIGINT)
    assert code == 130
    before = sorted(p.name for p in out.iterdir())

    def main(*overrides, resume=True):
        code = run.main([str(DEMO)] + sets(SHOTS + [f"output.dir={out}"] + list(overrides)) + ["--resume"] * resume)
        return code, capsys.readouterr().err

    code, err = main("generation.steps=4", "input.prompt='a cat'")
    assert code == 2 and err.startswith(f"error: {out / 'v.checkpoint'} was made with other settings: "
                                        "generation.steps (3 then, 4 now); input.prompt ("), err
    code, err = main("output.name=w")
    assert code == 2 and "error: " in err and "no checkpoint to resume" in err, err
    code, err = main(resume=False)  # a fresh run does not silently overwrite the interrupted one
    assert code == 2 and "holds an interrupted run of this name: continue it with --resume" in err, err
    assert sorted(p.name for p in out.iterdir()) == before
    code, err = main("output.overwrite=true", resume=False)  # starts over; the old state and partials go
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["v.json", "v.mp4", "v_frames", "v_sheet.png"]


def test_resume_finds_a_drawn_seed(tmp_path, capsys):
    """A config without a seed names its outputs <config>-<seed>: --resume finds the one checkpoint."""
    config = tmp_path / "noseed.toml"
    config.write_text(DEMO.read_text().replace("seed = 1\n", "").replace('"face.png"', json.dumps(str(REPO / "examples/face.png"))))
    out = tmp_path / "out"
    (out / "noseed-123.checkpoint").mkdir(parents=True)
    (out / "noseed-456.checkpoint").mkdir()
    code = run.main([str(config), "--set", f"output.dir={out}", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "found 2 (noseed-123.checkpoint, noseed-456.checkpoint); say which with --set " \
        "generation.seed=<seed>" in err, err
    (out / "noseed-456.checkpoint").rmdir()
    code = run.main([str(config), "--set", f"output.dir={out}", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and f"{out / 'noseed-123.checkpoint'}: no checkpoint to resume" in err, err


@pytest.mark.slow
def test_shots_are_streamed_to_the_outputs(tmp_path, monkeypatch):
    """Each shot's frames reach the mp4 encoder and the PNG folder before the next shot is denoised."""
    events = []
    write = video_io.Mp4Writer.write
    monkeypatch.setattr(video_io.Mp4Writer, "write", lambda self, chunk: (events.append(("mp4", len(chunk))),
                                                                      write(self, chunk))[1])
    printer = run.ProgressPrinter.__call__
    monkeypatch.setattr(run.ProgressPrinter, "__call__", lambda self, p: (events.append((p.stage, p.shot)),
                                                                          printer(self, p))[1])
    assert run.main([str(DEMO)] + sets(SHOTS + [f"output.dir={tmp_path}"])) == 0
    order = [e for n, e in enumerate(events) if n == 0 or e != events[n - 1]]
    assert order == [("video", 0), ("decode", 0), ("mp4", 4), ("video", 1), ("decode", 1), ("mp4", 3),
                     ("video", 2), ("decode", 2), ("mp4", 3)], order
    assert len(read_video(tmp_path / "v.mp4").frames) == 10 == len(list((tmp_path / "v_frames").iterdir()))

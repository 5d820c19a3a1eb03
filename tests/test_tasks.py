"""Task files (`[[task]]` tables, musev_lite/tasks.py) through the command line at the tiny preset: many
videos in one run, MuseV's prompt templates and img_length_ratio, every task checked before the first
starts, a failed task not stopping the others, skips and --resume per task, and `import-tasks` of MuseV's
task YAML (PyYAML, an optional extra: those tests skip without it, except the one for its missing message).

Runs are in-process with one thread (see tests/test_distributed.py), except the interrupted one."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, REPO, interrupt_when
from musev_lite import __main__ as entry
from musev_lite import run
from musev_lite.config import ConfigError
from musev_lite.tasks import fill_template, import_tasks, load_tasks, scaled_size, tasks_toml
from musev_lite.video_io import MediaError

BASE = """
[model]
preset = "tiny"
[input]
negative_prompt = "V1"
prompt = "a face, (eye blinks:{blink})"
[generation]
num_frames = 2
steps = 1
seed = 3
first_frame_steps = 1
context_frames = 4
context_overlap = 1
[output]
dir = "out"
formats = ["png"]
contact_sheet = false
"""
THREE = """
[[task]]
name = "a"
vars = { blink = 1.8 }
[task.input]
image = "face.png"

[[task]]
name = "b"
vars = { blink = 1.2 }
[task.input]
image = "other.png"

[[task]]
name = "c"
vars = { blink = 2 }
[task.input]
image = "face.png"
[task.generation]
num_frames = 3
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, (h, w) in {"face.png": (64, 64), "other.png": (96, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


def write(folder: Path, tasks: str, base: str = BASE) -> Path:
    path = folder / "tasks.toml"
    path.write_text(base + tasks)
    return path


def cli(*argv) -> tuple[int, str, str]:
    """run.main in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run.main([str(a) for a in argv])
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue(), err.getvalue()


def sidecar(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_example_runs_three_tasks_then_skips_them(tmp_path):
    """examples/tasks.toml: three tasks, each its own output set <name>-<seed>; the template filled, the size
    img_length_ratio gives; progress and the end table say which task. A second run skips all three."""
    argv = [REPO / "examples/tasks.toml", "--set", f"output.dir={tmp_path}", "--set", "generation.steps=1",
            "--set", "generation.num_frames=2", "--set", "generation.first_frame_steps=1",
            "--set", 'output.formats=["png"]']
    code, out, err = cli(*argv)
    assert code == 0, err
    names = [Path(line).name for line in out.split()]
    assert names == [f"{t}-1{s}" for t in ("blink", "bigger", "sea") for s in ("_frames", "_sheet.png", ".json")]
    sizes = {t: (sidecar(tmp_path / f"{t}-1.json")["height"], sidecar(tmp_path / f"{t}-1.json")["width"])
             for t in ("blink", "bigger", "sea")}
    assert sizes == {"blink": (128, 96), "bigger": (192, 128), "sea": (64, 96)}  # bigger: 128x96 x 1.5, floored to 64
    assert "(eye blinks:1.8)" in sidecar(tmp_path / "blink-1.json")["config"]["input"]["prompt"]
    assert "(eye blinks:1.2)" in sidecar(tmp_path / "bigger-1.json")["config"]["input"]["prompt"]
    assert "task 2/3  shot 1/1  step 1/1" in err and "task 3/3  first frame" in err
    assert "task 2/3 (bigger): starting, seed 1, size 192x128 by img_length_ratio 1.5" in err
    assert "tasks: 3 done" in err and f"3/3  sea     done     {tmp_path / 'sea-1_frames'}" in err
    code, out, err = cli(*argv)
    assert code == 0 and out == "" and "tasks: 3 skipped" in err
    assert "1/3  blink   skipped  blink-1.json exists (output.overwrite = true runs it again)" in err
    code, out, err = cli(*argv, "--set", "output.overwrite=true")  # runs them again
    assert code == 0 and len(out.split()) == 9 and "tasks: 3 done" in err


def test_prompt_templates_as_musev_fills_them():
    """MuseV (auto_prompt: KeywordMultiAttr2PromptTemplate, AttriributeIsText; MMCM merge_near_same_char): a
    prompt without braces is taken as it is; a value is its text, split at commas and joined with ", "; then
    each run of commas and spaces starting with a comma becomes ", "."""
    assert fill_template("(a:1),(b:2)", {}) == "(a:1),(b:2)"  # no template: untouched
    assert fill_template("(a:1),(eye blinks:{f}),,(b)", {"f": 1.8}) == "(a:1), (eye blinks:1.8), (b)"
    assert fill_template("{who} smiles", {"who": "girl,boy"}) == "girl, boy smiles"
    assert fill_template("{flag}", {"flag": True}) == "True"  # Python's str(), as MuseV's
    with pytest.raises(ConfigError, match=r"unknown template variable \{blinks\}; did you mean 'blink'\?"):
        fill_template("(eye blinks:{blinks})", {"blink": 1})
    with pytest.raises(ConfigError, match="does not enclose a template variable"):
        fill_template("a {b", {"b": 1})
    with pytest.raises(ConfigError, match="is not a template variable"):
        fill_template("a {}", {})


def test_img_length_ratio_as_musev_rounds():
    """scripts/inference/text2video.py: int(side * img_length_ratio // 64 * 64), numbers of its example.yaml."""
    assert scaled_size(1308, 736, 0.957) == (1216, 704)
    assert scaled_size(714, 563, 1.25) == (832, 640)
    assert scaled_size(317, 564, 2.221) == (704, 1216)
    assert scaled_size(960, 512, 1.0) == (960, 512)


MISTAKES = {
    "missing image": ("[[task]]\nname = \"c\"\nvars = { blink = 1 }\n[task.input]\nimage = \"nope.png\"\n",
                      "task 3/3 (c): input.image: image "),
    "unknown variable": ("[[task]]\nname = \"c\"\nvars = { blinks = 1 }\n",
                         "task 3/3 (c): input.prompt: unknown template variable {blink}"),
    "same name": ("[[task]]\nname = \"a\"\nvars = { blink = 1 }\n", "tasks 1 and 3 are both named 'a'"),
    "unknown key": ("[[task]]\nname = \"c\"\nprompt = \"x\"\n", "task 3/3 (c): unknown key prompt"),
    "no name": ("[[task]]\nvars = { blink = 1 }\n", "task 3/3: name = '' must be a non-empty name"),
    "bad setting": ("[[task]]\nname = \"c\"\nvars = { blink = 1 }\n[task.generation]\nstepz = 2\n",
                    "task 3/3 (c): unknown key generation.stepz; did you mean 'steps'?"),
    "ratio too small": ("[[task]]\nname = \"c\"\nimg_length_ratio = 0.5\nvars = { blink = 1 }\n"
                        "[task.input]\nimage = \"face.png\"\n",
                        "task 3/3 (c): img_length_ratio = 0.5 makes the video 0x0 from 64x64"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MISTAKES))
def test_a_bad_task_stops_the_run_before_any_task_starts(folder, kind):
    """Every task's settings and inputs are checked first: a mistake in task 3 is one error naming it, exit
    2, and nothing is written (tasks 1 and 2 did not run)."""
    text, message = MISTAKES[kind]
    code, out, err = cli(write(folder, THREE.rsplit("\n[[task]]", 1)[0] + "\n" + text))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert out == "" and not (folder / "out").exists()


@pytest.mark.slow
def test_output_name_is_refused(folder):
    code, _, err = cli(write(folder, THREE), "--set", "output.name=v")
    assert code == 2 and "task 1/3 (a): output.name = 'v' is set, but each task writes <task name>-<seed>" in err


@pytest.mark.slow
def test_a_failed_task_does_not_stop_the_others(folder, monkeypatch):
    """A task that fails while it runs (here a file error, as a full disk would give) is a line in the end
    table; the others run; the exit code is 2 with one error line naming it."""
    real = run.write_outputs

    def failing(job, out, pipe=None):
        if job.name == "b":
            raise MediaError("b.png: the disk went away")
        return real(job, out, pipe)

    monkeypatch.setattr(run, "write_outputs", failing)
    code, out, err = cli(write(folder, THREE))
    assert code == 2, err
    assert [Path(p).name for p in out.split()] == ["a-3_frames", "a-3.json", "c-3_frames", "c-3.json"]
    assert "task 2/3 (b) failed: b.png: the disk went away" in err and "tasks: 2 done, 1 failed" in err
    assert "  2/3  b  failed   b.png: the disk went away" in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: 1 of 3 tasks failed: task 2/3 (b): b.png: the disk went away"]
    assert len(list((folder / "out" / "c-3_frames").iterdir())) == 4  # its own num_frames = 3, + the image


def test_a_task_settings_and_inputs_override_the_defaults_and_set_wins(folder):
    tasks = load_tasks(write(folder, THREE), ["generation.steps=2"])
    assert [t.label for t in tasks] == ["task 1/3 (a)", "task 2/3 (b)", "task 3/3 (c)"]
    assert tasks[1].config.input.image == str(folder / "other.png")  # relative to the file's folder
    assert [t.config.generation.num_frames for t in tasks] == [2, 2, 3]
    assert all(t.config.generation.steps == 2 for t in tasks)  # --set applies to every task
    assert tasks[2].config.input.prompt == "a face, (eye blinks:2)"
    tasks = load_tasks(write(folder, THREE), ["generation.num_frames=5"])
    assert tasks[2].config.generation.num_frames == 5  # and wins over the task's own


def test_print_config_round_trips(folder):
    """--print-config of a task file: the shared sections and every task's resolved settings, which load to
    the same configurations."""
    code, out, err = cli(write(folder, THREE), "--print-config")
    assert code == 0, err
    again = folder / "again.toml"
    again.write_text(out)
    before, after = load_tasks(folder / "tasks.toml", []), load_tasks(again, [])
    assert [(t.name, t.config.input, t.config.generation) for t in before] == \
           [(t.name, t.config.input, t.config.generation) for t in after]
    assert tasks_toml(after) == out and "[[task]]\nname = \"c\"\n[task.input]\n" in out and "[task.vars]\nblink = 2\n" in out


@pytest.mark.slow
def test_resume_continues_the_interrupted_task(folder):
    """With output.checkpoint, an interrupt in task 2 keeps its checkpoint; the same command with --resume
    skips task 1 (done), continues task 2 from its checkpoint to the frames a run never stopped makes, and
    runs task 3. Seeds are drawn per task and found again by name."""
    base = BASE.replace("steps = 1\nseed = 3\n", "steps = 4\n")
    path = write(folder, THREE, base)
    args = [sys.executable, "-m", "musev_lite.run", str(path), "--set", "output.checkpoint=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    code, out, err = interrupt_when(process, "task 2/3  shot 1/1  step 2/4", signal.SIGINT)
    assert code == 130, err
    assert "continue with: python -m musev_lite.run" in err and "generation.seed" not in err.split("continue with:")[1]
    assert "  1/3  a  done" in err and "  2/3  b  not run" in err
    seed = next(p.name for p in (folder / "out").iterdir() if p.name.endswith(".checkpoint")).split("-")[1].split(".")[0]
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"task 2/3 (b): resuming, seed {seed}" in done.stderr and "tasks: 2 done, 1 skipped" in done.stderr
    assert not list((folder / "out").glob("*.checkpoint"))
    straight = subprocess.run([sys.executable, "-m", "musev_lite.run", str(path), "--set", f"output.dir={folder / 'straight'}",
                               "--set", f"generation.seed={seed}"], capture_output=True, text=True, cwd=REPO,
                              env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr
    for frame in sorted((folder / "out" / f"b-{seed}_frames").iterdir()):
        assert np.array_equal(np.asarray(Image.open(frame)), np.asarray(Image.open(folder / "straight" / f"b-{seed}_frames" / frame.name)))


# ---------------------------------------------------------------------------------------------
# import-tasks


def needs_yaml():
    pytest.importorskip("yaml", reason="import-tasks reads YAML with PyYAML, the optional `yaml` extra")


def test_import_tasks_converts_musev_yaml(tmp_path, capsys):
    """The hand-written tests/fixtures/musev_tasks.yaml (MuseV's shape): `${.key}` resolved (a chain too),
    nulls dropped, the template left for the run to fill, a video_is_middle video as a control, MuseV's
    per-task keys as settings; the TOML, under a [model] section, loads with MuseV's sizes."""
    needs_yaml()
    assert entry.main(["import-tasks", str(FIXTURES / "tasks/musev_tasks.yaml")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# 3 tasks converted by musev-lite import-tasks from MuseV's musev_tasks.yaml")
    (tmp_path / "tasks.toml").write_text('[model]\npreset = "tiny"\n\n' + text)
    girl, sea, dance = load_tasks(tmp_path / "tasks.toml", [])
    assert (girl.name, girl.variables) == ("girl", {"eye_blinks_factor": 1.8})
    assert girl.config.input.refer_image == girl.config.input.ip_adapter_image == str(tmp_path / "images/girl.png")
    assert girl.config.input.prompt == ("(masterpiece, best quality, highres:1), (1girl, solo:1), (eye blinks:1.8), "
                                        "(head wave:1.3)")
    assert (girl.config.generation.height, girl.config.generation.width) == (832, 640)  # 714, 563 x 1.25 // 64
    assert (sea.config.generation.height, sea.config.generation.width) == (704, 1216)
    assert sea.config.generation.motion_speed == 6.0 and sea.config.input.ip_adapter_image == ""
    assert dance.config.input.video == "" and dance.config.input.control[0].path == str(tmp_path / "videos/pose.mp4")
    assert dance.config.input.ip_adapter_image == str(tmp_path / "images/girl.png")  # ${.refer_image} -> ${.condition_images}
    assert dance.config.input.prompt == "a girl is dancing, dance"  # {name} is the task's name
    rooted = import_tasks(FIXTURES / "tasks/musev_tasks.yaml", root=tmp_path / "musev")
    assert f'image = "{tmp_path / "musev/images/girl.png"}"' in rooted


def test_import_tasks_errors(tmp_path, capsys):
    needs_yaml()
    cases = {"- name: a\n  refer_image: ${.condition_images}\n": "task 1: '${.condition_images}': only ${.key} of a "
             "key of the same task is supported; the task has no 'condition_images'",
             "- name: a\n  x: ${.y}\n  y: ${.x}\n": "refers to itself",
             "name: a\n": "must be a YAML list of tasks",
             "- name: [a\n": "is not readable YAML"}
    for text, message in cases.items():
        (tmp_path / "t.yaml").write_text(text)
        assert entry.main(["import-tasks", str(tmp_path / "t.yaml")]) == 2
        assert message in capsys.readouterr().err


def test_import_tasks_without_pyyaml_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    assert entry.main(["import-tasks", str(FIXTURES / "tasks/musev_tasks.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: reading MuseV's YAML task files needs PyYAML, which is not installed: "
                          "pip install pyyaml (or pip install \"musev-lite[yaml]\")")


def test_musev_example_yaml_converts(tmp_path):
    """MuseV's own configs/tasks/example.yaml, as published, from a checkout named by MUSEV_SRC (as
    tests/make_fixtures.py takes it; skipped without): every task converts and loads, sized as MuseV sizes it."""
    needs_yaml()
    import yaml
    source = Path(os.environ.get("MUSEV_SRC", "/nonexistent")) / "configs/tasks/example.yaml"
    if not source.is_file():
        pytest.skip("set MUSEV_SRC to a MuseV checkout to convert its configs/tasks/example.yaml")
    (tmp_path / "tasks.toml").write_text('[model]\npreset = "tiny"\n\n' + import_tasks(source))
    tasks = load_tasks(tmp_path / "tasks.toml", [])
    raw = yaml.safe_load(source.read_text())
    assert [t.name for t in tasks] == [str(t["name"]) for t in raw]
    for task, original in zip(tasks, raw):
        ratio = original.get("img_length_ratio", 1.0)
        expected = (int(original["height"] * ratio // 64 * 64), int(original["width"] * ratio // 64 * 64))
        assert (task.config.generation.height, task.config.generation.width) == expected
        assert "{" not in task.config.input.prompt
        assert bool(task.config.input.control) == bool(original.get("video_is_middle"))


def test_import_tasks_fission_and_default_names(tmp_path):
    """MuseV's task fission (a text value with '|': a task per alternative) and its name for a task without
    one (its index); each alternative gets its own name here, so that it writes its own outputs."""
    needs_yaml()
    (tmp_path / "t.yaml").write_text("- prompt: a cat|a dog\n  height: 64\n  width: 64\n")
    (tmp_path / "t.toml").write_text('[model]\npreset = "tiny"\n' + import_tasks(tmp_path / "t.yaml"))
    tasks = load_tasks(tmp_path / "t.toml", [])
    assert [(t.name, t.config.input.prompt) for t in tasks] == [("0_1", "a cat"), ("0_2", "a dog")]
    assert all(t.config.generation.height == 64 for t in tasks)

"""Promises the README makes about a run that the other test files do not hold: a run that fails its
checks writes nothing, not even its output folder; the demo pipeline says its dtype and agrees with the
command line's demo at the same dtype; its default negative prompt fits its tokenizer while a real model
keeps MuseV's; `musev-lite COMMAND --help` is named as called; paths in errors are resolved."""

import ast
import sys
import tomllib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO, sets
from musev_lite import __main__ as cli_main
from musev_lite import memory, run
from musev_lite.pipeline import MuseVPipeline
from musev_lite.video_io import write_mp4

FACE = REPO / "examples/face.png"
SMALL = ["model.preset=tiny", f"input.image={FACE}", "input.prompt=a face", "generation.num_frames=2",
         "generation.steps=1", "generation.seed=3", 'output.formats=["png"]', "output.contact_sheet=false",
         "output.name=v"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_main(out, *overrides, config=REPO / "examples/demo.toml"):
    return run.main([str(config)] + sets(SMALL + [f"output.dir={out}"] + list(overrides)))


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def sdxl_lora(path):
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 2)}, path)


FAILURES = {  # what breaks -> (overrides, the error line's text); every one is found after the config is read
    "missing weights": (["model.preset=musev_referencenet", "model.weights_dir={tmp}/nowhere"],
                        "lacks unet.safetensors"),
    "bad device": (["model.device=cuda:99"], "model.device = 'cuda:99'"),
    "missing LoRA file": (["model.lora=[{{path = '{tmp}/nowhere.safetensors'}}]"], "nowhere.safetensors: no such file"),
    "LoRA for another base": (["model.lora=[{{path = '{tmp}/sdxl.safetensors'}}]"], "was made for SDXL"),
    "memory refusal": (["generation.height=512", "generation.width=512"], "needs about"),
    "unknown ControlNet": (["input.control=[{{path = '{tmp}/pose.mp4', controlnet = 'controlnet_depth'}}]"],
                           "names ControlNet 'controlnet_depth', but this pipeline has controlnet"),
    "bad prompt weight": (["input.prompt=(face:1.2.3)"], "input.prompt: prompt weight '1.2.3'"),
}


@pytest.mark.parametrize("folder", ["new", "existing"])
@pytest.mark.parametrize("kind", list(FAILURES))
def test_a_run_that_fails_its_checks_writes_nothing(tmp_path, capsys, monkeypatch, kind, folder):
    """No output folder is made before the run has passed its checks; an existing one is left as it was
    (the lock and staging folder of a run that got that far are gone)."""
    write_mp4(tmp_path / "pose.mp4", [np.zeros((3, 64, 64, 3), np.uint8)], fps=12)
    sdxl_lora(tmp_path / "sdxl.safetensors")
    monkeypatch.setattr(memory, "available_memory", lambda device: (50_000_000, "MemAvailable in /proc/meminfo"))
    out = tmp_path / "out"
    if folder == "existing":
        out.mkdir()
    overrides, message = FAILURES[kind]
    assert run_main(out, *[item.format(tmp=tmp_path) for item in overrides]) == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert message in line and "Traceback" not in err, err
    assert (sorted(p.name for p in out.iterdir()) == []) if folder == "existing" else not out.exists()


def test_resume_without_the_folder_writes_nothing(tmp_path, capsys):
    assert run.main([str(REPO / "examples/demo.toml")] + sets(SMALL + [f"output.dir={tmp_path / 'gone'}"]) + ["--resume"]) == 2
    assert "does not exist, so it holds no checkpoint to resume" in capsys.readouterr().err
    assert not (tmp_path / "gone").exists()


@pytest.mark.slow
def test_the_demo_says_its_dtype_and_agrees_with_the_command_line(tmp_path, one_thread, capsys):
    """MuseVPipeline.demo() is float32 unless told (as from_pretrained); the command line's demo runs in
    model.dtype and says so. At the same dtype both make the same frames."""
    pipe = MuseVPipeline.demo(seed=0)
    assert pipe.dtype == torch.float32 and "In float32 unless `dtype`" in MuseVPipeline.demo.__doc__
    half = MuseVPipeline.demo(seed=0, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.vae.encoder.conv_in.weight.dtype == torch.float32
    assert run_main(tmp_path, "model.dtype=float32") == 0
    assert "dtype:" not in capsys.readouterr().err  # said only when "auto" chose it
    cli_frames = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "v_frames").iterdir())])
    api = pipe("a face", FACE, num_frames=2, steps=1, seed=3)
    assert np.array_equal(api.frames, cli_frames)


@pytest.mark.slow
def test_the_demo_default_negative_prompt_fits_its_tokenizer(tmp_path, capsys):
    """The byte-level tokenizer would cut MuseV's V2 preset (a token per letter): the demo's default is V1,
    with no warning, from Python and from the command line; a real model's default stays V2."""
    pipe = MuseVPipeline.demo(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = pipe("a face", FACE, num_frames=2, steps=1, seed=3)
    assert np.array_equal(default.frames, pipe("a face", FACE, num_frames=2, steps=1, seed=3, negative_prompt="V1").frames)
    with pytest.warns(UserWarning, match="prompt truncated"):
        pipe("a face", FACE, num_frames=2, steps=1, seed=3, negative_prompt="V2")
    pipe.save_pretrained(tmp_path / "w")
    assert MuseVPipeline.from_pretrained(tmp_path / "w").negative_prompt == "V2"  # what a real model does
    config = tmp_path / "c.toml"
    config.write_text('[model]\npreset = "tiny"\n')  # no negative_prompt: the pipeline's default
    capsys.readouterr()
    assert run_main(tmp_path / "unset", config=config) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("command, usage", [
    (["run"], "usage: musev-lite run "), (["fetch"], "usage: musev-lite fetch "),
    (["convert", "musev"], "usage: musev-lite convert musev "), (["convert", "sd15"], "usage: musev-lite convert sd15 "),
    (["convert", "controlnet"], "usage: musev-lite convert controlnet "),
])
def test_help_names_the_command_as_called(capsys, command, usage):
    with pytest.raises(SystemExit):
        cli_main.main(command + ["--help"])
    assert capsys.readouterr().out.startswith(usage)
    with pytest.raises(SystemExit):
        run.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m musev_lite.run ")


def test_paths_in_errors_are_resolved(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs/c.toml"
    config.write_text('[model]\nweights_dir = "../weights/musev_referencenet"\n')
    assert run.main([str(config), "--set", f"output.dir={tmp_path / 'out'}"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"model.weights_dir '{tmp_path / 'weights/musev_referencenet'}' lacks unet.safetensors" in line
    assert "/../" not in line and f"--dest {tmp_path / 'weights/musev_referencenet'} " in line


def test_the_six_dependencies_are_all_that_is_imported():
    """The README's six direct runtime dependencies are pyproject's, and the package (with its converters)
    imports nothing else outside the standard library, but for an optional extra's package in the module of
    that extra's command, imported in a try that catches its ImportError (PyYAML for import-tasks)."""
    six = ["torch", "safetensors", "numpy", "pillow", "tokenizers", "av"]
    assert "six direct runtime dependencies: " + ", ".join(six) in " ".join((REPO / "README.md").read_text().split())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(d.split(">")[0].split("=")[0] for d in project["dependencies"]) == sorted(six)
    assert project["optional-dependencies"]["yaml"] == ["pyyaml"]
    optional = {"musev_lite/tasks.py": {"yaml"}}
    allowed = {"torch", "safetensors", "numpy", "PIL", "tokenizers", "av", "musev_lite"} | sys.stdlib_module_names
    for path in sorted((REPO / "musev_lite").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = {id(node) for attempt in ast.walk(tree) if isinstance(attempt, ast.Try)
                   and any(getattr(h.type, "id", None) == "ImportError" for h in attempt.handlers)
                   for node in attempt.body if isinstance(node, ast.Import)}
        extra = optional.get(path.relative_to(REPO).as_posix(), set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                ok = name.split(".")[0] in allowed or (id(node) in guarded and name in extra)
                assert ok, f"{path.relative_to(REPO)} imports {name}"

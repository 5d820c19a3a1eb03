"""`python -m musev_lite.run`: an end-to-end run at tiny size, and one clear error (exit code 2, no
traceback, nothing written) for every kind of bad configuration or input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from musev_lite.device import resolve_dtype
from musev_lite.run import main

TINY = ["model.preset=tiny", "generation.steps=2", "generation.context_frames=4", "generation.context_overlap=2"]


def run_cli(tmp_path, *overrides, config=REPO / "examples/demo.toml"):
    args = [sys.executable, "-m", "musev_lite.run", str(config)]
    for item in TINY + [f"output.dir={tmp_path}"] + list(overrides):
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_end_to_end(tmp_path):
    done = run_cli(tmp_path, "generation.num_frames=5", "generation.n_batch=2", "generation.seed=4",
                   "output.fps=8", 'output.formats=["mp4", "png"]', "output.name=clip")
    assert done.returncode == 0, done.stderr
    assert "pipeline demo, not a trained model" in done.stderr and "step 2/2" in done.stderr
    printed = done.stdout.split()
    assert printed == [str(tmp_path / n) for n in ("clip.mp4", "clip_frames", "clip_sheet.png", "clip.json")]
    with av.open(str(tmp_path / "clip.mp4")) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert len(frames) == 2 * 5 + 1  # n_batch * num_frames + the condition frame
        assert (frames[0].height, frames[0].width) == (128, 96)  # examples/face.png's size
        assert stream.average_rate == 8
    sidecar = json.loads((tmp_path / "clip.json").read_text())
    assert sidecar["seed"] == 4 and sidecar["frames"] == 11 and sidecar["demo_weights"] is True
    assert sidecar["config"]["generation"]["num_frames"] == 5 and sidecar["musev_lite_version"]
    # model.dtype = "auto" (the default): said on stderr and recorded as resolved, from what the CPU offers
    expected = "bfloat16" if cpu_computes_bfloat16() else "float32"
    assert sidecar["config"]["model"]["dtype"] == "auto" and sidecar["dtype"] == expected
    assert f'dtype: {expected} (model.dtype = "auto": ' in done.stderr
    assert Image.open(tmp_path / "clip_sheet.png").size[0] > 96
    assert len(list((tmp_path / "clip_frames").iterdir())) == 11


def cpu_computes_bfloat16() -> bool:
    """Read here, independently of the code: bfloat16 instructions in /proc/cpuinfo, and torch's kernels not
    held below AVX-512 by the variables that emulate an older CPU (CI's AVX2 leg sets both)."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    capped = (os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2")
              or os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper().startswith(("SSE", "AVX2", "AVX_")))
    return bool({"avx512_bf16", "amx_bf16"} & set(flags)) and not capped


def test_dtype_auto_and_explicit():
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_computes_bfloat16() else torch.float32)
    assert resolve_dtype("auto", "mps") == torch.float32  # no bfloat16 hardware known there
    assert resolve_dtype("float16", "cpu") == torch.float16 and resolve_dtype("float32", "cuda") == torch.float32


@pytest.mark.slow
def test_same_config_and_seed_same_frames(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        done = run_cli(out, "generation.num_frames=3", "generation.seed=9", 'output.formats=["png"]',
                       "output.contact_sheet=false", "output.name=v")
        assert done.returncode == 0, done.stderr
    for name in sorted(p.name for p in (first / "v_frames").iterdir()):
        assert np.array_equal(np.asarray(Image.open(first / "v_frames" / name)),
                              np.asarray(Image.open(second / "v_frames" / name)))


@pytest.fixture
def setup(tmp_path):
    """A writable output dir and a valid tiny config; each case breaks one thing."""
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    (tmp_path / "a_file").write_text("x")
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npreset = "tiny"\n[input]\nimage = "{REPO / "examples/face.png"}"\n'
                      f'[output]\ndir = "{tmp_path / "out"}"\n')
    return tmp_path, config


CASES = {
    "unknown key": (["generation.stepz=3"], "unknown key generation.stepz; did you mean 'steps'?"),
    "unknown section": (["render.steps=3"], "unknown section [render]"),
    "wrong type": (["generation.steps=\"many\""], "generation.steps must be an integer"),
    "negative frames": (["generation.num_frames=-2"], "generation.num_frames = -2 must be at least 1"),
    "size not divisible": (["generation.height=100"], "generation.height = 100 is not divisible by 8"),
    "missing image": (["input.image=nowhere/face.png"], "input.image: image nowhere/face.png: no such file"),
    "unreadable image": (["input.image={tmp}/junk.png"], "junk.png: not a readable image"),
    "missing weights": (["model.preset=musev_referencenet", "model.weights_dir={tmp}/w"],
                        "lacks unet.safetensors, unet.json"),
    "output dir not writable": (["output.dir={tmp}/a_file/out"], "is not writable"),
    "unknown preset": (["model.preset=musev9"], "model.preset = 'musev9' is not one of"),
    "bad --set": (["steps=3"], "expected section.key=value"),
    "overlap >= context": (["generation.context_overlap=12"], "context_overlap = 12 must be"),
    "unknown format": (['output.formats=["avi"]'], "output.formats entry = 'avi'"),
    "guidance < 1": (["generation.guidance_scale=0.9"], "guidance_scale = 0.9 must be >= 1"),
    "fps <= 0": (["output.fps=-1"], "output.fps = -1.0 must be a number from 1 to 240"),
    "bad prompt weight": (["input.prompt=(face:1.2.3)"], "prompt weight '1.2.3'"),
    "no cuda": (["model.device=cuda"], "no CUDA device"),
    "negative seed": (["generation.seed=-5"], "generation.seed = -5 must be a non-negative integer"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_every_mistake_is_one_clear_line(setup, capsys, kind):
    tmp, config = setup
    overrides, message = CASES[kind]
    argv = [str(config)]
    for item in overrides:
        argv += ["--set", item.format(tmp=tmp)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    out = tmp / "out"
    assert not out.exists() or list(out.iterdir()) == []  # nothing written


def test_syntax_error_and_missing_config(setup, capsys):
    tmp, _ = setup
    (tmp / "broken.toml").write_text("[model\n")
    assert main([str(tmp / "broken.toml")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert main([str(tmp / "absent.toml")]) == 2
    assert "config file" in capsys.readouterr().err and True


@pytest.mark.slow
def test_errors_from_a_subprocess_have_no_traceback(tmp_path):
    done = run_cli(tmp_path, "generation.num_frames=0")
    assert done.returncode == 2 and done.stderr.startswith("error: generation.num_frames = 0")
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_lcm_example_runs(tmp_path):
    """examples/lcm.toml on the tiny preset: 4 LCM steps, with its LoRA entry pointed at a tiny file in
    lcm-lora-sdv1-5's layout (kohya keys, alpha) for two layers of the demo UNet."""
    from safetensors.torch import save_file

    from musev_lite.pipeline import MuseVPipeline

    unet, tensors = MuseVPipeline.demo().unet, {}
    for module in ("down_blocks.0.resnets.0.time_emb_proj", "down_blocks.0.attentions.0.proj_in"):
        out_features, in_features, *kernel = unet.get_submodule(module).weight.shape
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = 0.01 * torch.randn(4, in_features, *kernel)
        tensors[f"{stem}.lora_up.weight"] = 0.01 * torch.randn(out_features, 4, *[1] * len(kernel))
        tensors[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors")
    lora = f"model.lora=[{{path = '{tmp_path / 'pytorch_lora_weights.safetensors'}', scale = 1.0}}]"
    done = run_cli(tmp_path, lora, "generation.num_frames=4", "generation.steps=4", config=REPO / "examples/lcm.toml")
    assert done.returncode == 0, done.stderr
    assert "step 4/4" in done.stderr and "pytorch_lora_weights.safetensors (scale 1): merged into 2 UNet layers (none temporal)" in done.stderr
    assert json.loads((tmp_path / "lcm-1.json").read_text())["config"]["generation"]["sampler"] == "lcm"

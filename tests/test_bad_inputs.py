"""Bad inputs at every entry point, one table each: the run command and its configuration, the Python
API, the converters, fetch, images, videos, keypoint JSON and LoRA files. Every case must give one
clear message (a regex on its key part), exit code 2 from a command line (a ValueError subclass from
a function), no traceback, and leave no file behind. After the tables: names that would leave their folder,
the other forms the Python API takes, output names against the file system's name limit, and a full disk
(by fault injection at every kind of write, and on a real tmpfs where the test process may mount one)."""

import errno
import functools
import http.server
import io
import json
import os
import pickle
import re
import shlex
import shutil
import socket
import struct
import subprocess
import threading
import warnings
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import FIXTURES, REPO
from musev_lite import fetch, lora, pose, run, video_io
from musev_lite.convert import controlnet as convert_controlnet
from musev_lite.convert import musev as convert_musev
from musev_lite.convert import sd15 as convert_sd15
from musev_lite.checkpoint import fingerprint, save_state
from musev_lite.config import load_config
from musev_lite.device import resolve_dtype
from musev_lite.pipeline import ControlVideo, MuseVPipeline, RunState

FACE = REPO / "examples/face.png"
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"


class Executable:
    """A pickle that would run code when loaded."""

    def __reduce__(self):
        return (os.system, ("echo never",))


def png_header(width: int, height: int) -> bytes:
    """A PNG that states its size and holds no pixels (enough for a decompression-bomb check)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every bad input file, made once."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    whole = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(whole, "PNG")
    (d / "truncated.png").write_bytes(whole.getvalue()[:60])
    (d / "folder.png").mkdir()
    Image.new("RGB", (1, 1)).save(d / "one_pixel.png")
    Image.fromarray(np.full((16, 16), 7.0, np.float32), "F").save(d / "float.tiff")
    Image.fromarray(np.full((16, 16), -5, np.int32)).save(d / "negative.tiff")
    (d / "bomb.png").write_bytes(png_header(60000, 60000))
    (d / "empty.mp4").write_bytes(b"")
    video_io.write_mp4(d / "video.mp4", [np.zeros((4, 16, 16, 3), np.uint8)], 8)
    (d / "truncated.mp4").write_bytes((d / "video.mp4").read_bytes()[:300])
    with wave.open(str(d / "sound.wav"), "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(8000)
        sound.writeframes(b"\0\0" * 800)
    (d / "empty_folder").mkdir()
    with open(d / "code.ckpt", "wb") as f:
        pickle.dump({"weights": Executable()}, f)
    (d / "empty.safetensors").write_bytes(b"")
    (d / "garbage.safetensors").write_bytes(b"garbage" * 10)
    save_file({"a": torch.zeros(2)}, d / "other.safetensors")
    save_file({}, d / "no_tensors.safetensors")
    save_file({f"{PROJ_IN}.lora_down.weight": torch.zeros(4, 320)}, d / "half_lora.safetensors")
    save_file({f"{PROJ_IN}.lora_down.weight": torch.zeros(4, 320), f"{PROJ_IN}.lora_up.weight": torch.zeros(320, 4),
               f"{PROJ_IN}.alpha": torch.tensor(float("nan"))}, d / "nan_lora.safetensors")
    attn2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{attn2}.lora_down.weight": torch.zeros(4, 2048), f"{attn2}.lora_up.weight": torch.zeros(320, 4)},
              d / "sdxl_lora.safetensors")
    save_file({"emb_params": torch.zeros(2, 7)}, d / "narrow_embedding.safetensors")
    (d / "bad.json").write_text("{not json")
    (d / "not_utf8.toml").write_bytes(b"\xff\xfe\x00")
    (d / "broken.toml").write_text("[model\n")
    weights = d / "weights_garbage"  # every file a weights folder needs, the UNet's unreadable
    for name in ("unet.safetensors", "vae.safetensors", "text_encoder.safetensors", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "scheduler.json"):
        (weights / name).parent.mkdir(parents=True, exist_ok=True)
        (weights / name).write_bytes(b"garbage")
    for name in ("unet.json", "vae.json", "text_encoder.json"):
        (weights / name).write_text("{}")
    (d / "weights_bad_json").mkdir()
    for path in weights.rglob("*"):
        if path.is_file():
            target = d / "weights_bad_json" / path.relative_to(weights)
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(b"{not json" if path.name == "unet.json" else path.read_bytes())
    keypoints = {
        "bad": "{oops", "empty_list": "[]", "number": "5", "people_text": '{"people": "x"}',
        "no_fields": '{"people": [{}]}', "three_numbers": '{"people": [{"pose_keypoints_2d": [1, 2, 3]}]}',
        "nan": '{"people": [{"pose_keypoints_2d": [NaN, 0, 1' + ", 0" * 51 + "]}]}",
        "pixels": '{"people": [{"pose_keypoints_2d": [100, 200, 1' + ", 0" * 51 + "]}]}",
        "canvas": '{"canvas_width": -1, "canvas_height": 5, "people": []}',
        "strings": '{"people": [{"pose_keypoints_2d": ["a", "b", "c"]}]}',
    }
    for name, text in keypoints.items():
        (d / f"kp_{name}.json").write_text(text)
    (d / "kp_binary.json").write_bytes(b"\xff\xfe\x00")
    limit_inputs(d)
    weights_folders(d)
    return d


def limit_inputs(d):
    """Inputs past a limit: a point 1e298 canvases away, JSON nested 100,000 deep, a rank-0 LoRA and one with
    nested metadata, a config file name too long for the default output name; and good files to go with them:
    an embedding, a diffusers ControlNet folder (the tiny fixture of test_controlnet.py)."""
    (d / ("c" * 250 + ".toml")).write_text('[model]\npreset = "tiny"\n')
    huge = '{"canvas_width": 100, "canvas_height": 100, "people": [{"pose_keypoints_2d": [1e300, 5, 1' + ", 0" * 51 + "]}]}"
    (d / "kp_huge.json").write_text(huge)
    (d / "kp_deep.json").write_text("[" * 100_000 + "]" * 100_000)
    save_file({f"{PROJ_IN}.lora_down.weight": torch.zeros(0, 320), f"{PROJ_IN}.lora_up.weight": torch.zeros(320, 0)},
              d / "rank0_lora.safetensors")
    save_file({f"{PROJ_IN}.lora_down.weight": torch.zeros(4, 320), f"{PROJ_IN}.lora_up.weight": torch.zeros(320, 4)},
              d / "deep_metadata_lora.safetensors", metadata={"lora_adapter_metadata": "[" * 1000 + "]" * 1000})
    save_file({"emb_params": torch.zeros(2, 32)}, d / "embedding.safetensors")
    (d / "controlnet_folder").mkdir()
    shutil.copy(FIXTURES / "controlnet/config.json", d / "controlnet_folder/config.json")
    shutil.copy(FIXTURES / "controlnet/weights.safetensors", d / "controlnet_folder/diffusion_pytorch_model.safetensors")


def weights_folders(d):
    """The demo's weights folder, and copies of it with one config changed: a ControlNet narrower than the
    UNet, a ControlNet of another text width, unet.json / scheduler.json nested 100,000 deep."""
    demo = d / "demo_weights"
    MuseVPipeline.demo(seed=0).save_pretrained(demo)
    changes = {
        "narrow_controlnet": ("controlnet.json", lambda c: dict(c, block_out_channels=[16, 16, 16, 16], norm_num_groups=8)),
        "wide_text_controlnet": ("controlnet.json", lambda c: dict(c, cross_attention_dim=64)),
        "deep_unet_json": ("unet.json", None),
        "deep_scheduler": ("scheduler.json", None),
    }
    for name, (file, change) in changes.items():
        shutil.copytree(demo, d / name)
        target = d / name / file
        text = json.dumps(change(json.loads(target.read_text()))) if change else "[" * 100_000 + "]" * 100_000
        target.write_text(text)


def files_in(root) -> dict:
    """Every file under `root` with its size and modification time (folders are not outputs)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def one_error_line(err: str, pattern: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


# ---------------------------------------------------------------------------------------------
# The run command: `--set` overrides of a valid tiny configuration, or a configuration file of its own

def slow_if(case, *slow_ids):
    """A table row (id, *arguments) as a pytest.param, marked slow when its id is one of slow_ids."""
    return pytest.param(*case[1:], id=case[0], marks=pytest.mark.slow if case[0] in slow_ids else ())


RUN = [
    ("guidance nan", ["generation.guidance_scale=nan"], r"generation\.guidance_scale = nan must be a finite number"),
    ("guidance inf", ["generation.guidance_scale=inf"], r"generation\.guidance_scale = inf must be a finite number"),
    ("guidance end inf", ["generation.guidance_scale_end=inf"], r"guidance_scale_end = inf must be a finite number"),
    ("first-frame guidance huge", ["generation.first_frame_guidance=1000"], r"first_frame_guidance = 1000.0 must be at most 100"),
    ("ip scale inf", ["generation.ip_adapter_scale=inf"], r"ip_adapter_scale = inf must be a finite number"),
    ("fps inf", ["output.fps=inf"], r"output\.fps = inf must be a number from 1 to 240"),
    ("fps 1e9", ["output.fps=1e9"], r"output\.fps = 1000000000\.0 must be a number from 1 to 240"),
    ("fps 1e-9", ["output.fps=1e-9"], r"output\.fps = 1e-09 must be a number from 1 to 240"),
    ("gif too fast", ['output.formats=["gif"]', "output.fps=60"], r"output\.fps = 60\.0 is too fast for gif"),
    ("steps 1001", ["generation.steps=1001"], r"generation\.steps = 1001 must be at most 1000"),
    ("steps 1.5", ["generation.steps=1.5"], r"generation\.steps must be an integer; got 1\.5"),
    ("frames true", ["generation.num_frames=true"], r"generation\.num_frames must be an integer; got True"),
    ("height negative", ["generation.height=-8"], r"generation\.height = -8 must be >= 0"),
    ("size multiple 12", ["generation.size_multiple=12"], r"size_multiple = 12 must be a multiple of 8"),
    ("schedule unknown", ["generation.context_schedule=random"], r"context_schedule = 'random' is not one of uniform_v2"),
    ("sampler unknown", ["generation.sampler=dpm"], r"generation\.sampler = 'dpm' is not one of euler, ddim, lcm"),
    ("lcm steps 60", ["generation.sampler=lcm", "generation.steps=60"],
     r"generation\.steps = 60 is more than the 'lcm' sampler takes \(50, .*4-8 steps: lower it, or use sampler 'euler'"),
    ("lcm first frame steps 51", ["generation.sampler=lcm", "generation.first_frame_steps=51"],
     r"generation\.first_frame_steps = 51 is more than the 'lcm' sampler takes \(50"),
    ("guidance method unknown", ["generation.guidance_method=cosine"], r"guidance_method = 'cosine' is not one of linear"),
    ("noise share 2", ["generation.w_ind_noise=2"], r"w_ind_noise = 2\.0 must be in \[0, 1\]"),
    ("img weight negative", ["generation.img_weight=-0.1"], r"img_weight = -0\.1 must be in \[0, 1\]"),
    ("motion speed 0", ["generation.motion_speed=0"], r"motion_speed = 0\.0 must be > 0"),
    ("window batch 0", ["generation.window_batch=0"], r"window_batch = 0 must be at least 1"),
    ("seed text", ["generation.seed=abc"], r"generation\.seed must be an integer; got 'abc'"),
    ("name a path", ["output.name=a/b"], r"output\.name = 'a/b' must be a file stem, not a path"),
    ("name ..", ["output.name=.."], r"output\.name = '\.\.' must not start with a dot"),
    ("no formats", ["output.formats=[]"], r"output\.formats is empty"),
    ("format a number", ["output.formats=[1]"], r"output\.formats must be a list of strings"),
    ("overwrite text", ["output.overwrite=yes"], r"output\.overwrite must be true or false; got 'yes'"),
    ("dtype float64", ["model.dtype=float64"], r"model\.dtype = 'float64' is not one of auto, float32"),
    ("device unknown", ["model.device=tpu"], r"model\.device = 'tpu' is not a torch device"),
    ("device absent", ["model.device=cuda:7"], r"model\.device = 'cuda:7' but (this torch has no CUDA|there are \d+ CUDA)"),
    ("preset empty", ["model.preset="], r"model\.preset = '' is not one of tiny"),
    ("lora a string", ["model.lora=x.safetensors"], r"model\.lora must be tables: \[\[model\.lora\]\]"),
    ("lora no path", ['model.lora=[{{path=""}}]'], r"model\.lora\[0\]\.path is empty"),
    ("lora scale 100", ['model.lora=[{{path="a", scale=100}}]'], r"model\.lora\[0\]\.scale = 100\.0 must be in \[-10, 10\]"),
    ("lora unknown key", ['model.lora=[{{path="a", weight=1}}]'], r"unknown key model\.lora\[0\]\.weight; known: path, scale"),
    ("lora missing", ['model.lora=[{{path="{inputs}/nowhere.safetensors"}}]'],
     r"model\.lora\[0\]\.path: .*nowhere\.safetensors: no such file"),
    ("lora not a lora", ['model.lora=[{{path="{inputs}/other.safetensors"}}]'], r"1 key\(s\) are not LoRA weights.*: a\."),
    ("lora nan", ['model.lora=[{{path="{inputs}/nan_lora.safetensors"}}]'], r"hold NaN or infinite values: .*\.alpha"),
    ("image a folder", ["input.image={inputs}/folder.png"], r"input\.image: image .*folder\.png: is a folder, not an image"),
    ("image empty", ["input.image={inputs}/empty.png"], r"input\.image: image .*empty\.png: not a readable image"),
    ("image truncated", ["input.image={inputs}/truncated.png"], r"truncated\.png: not a readable image \(image file is truncated"),
    ("image 1x1", ["input.image={inputs}/one_pixel.png"], r"video size 0x0 \(width x height\) from the image's 1x1 is too small"),
    ("image float out of range", ["input.image={inputs}/float.tiff"], r"float\.tiff: mode F values must lie in 0\.\.1, found 7"),
    ("image bomb", ["input.image={inputs}/bomb.png"], r"bomb\.png: not a readable image \(.*decompression bomb"),
    ("refer image text", ["input.refer_image={inputs}/text.png"], r"input\.refer_image: image .*text\.png: not a readable image"),
    ("ip image missing", ["input.ip_adapter_image={inputs}/nowhere.png"], r"input\.ip_adapter_image: image .*: no such file"),
    ("prompt weight overflow", ["input.prompt=(face:" + "9" * 400 + ")"], r"prompt weight of 'face' .* is inf"),
    ("--set no =", ["generation.steps"], r"--set 'generation\.steps': expected section\.key=value"),
    ("--set no key", ["generation=3"], r"--set 'generation=3': expected section\.key=value"),
    ("weights dir a file", ["model.preset=musev", "model.weights_dir={inputs}/text.png"],
     r"model\.weights_dir '.*text\.png' lacks unet\.safetensors.*python -m musev_lite\.fetch musev"),
    ("weights unreadable", ["model.preset=musev", "model.weights_dir={inputs}/weights_garbage"],
     r"unet\.safetensors: not a readable safetensors file"),
    ("weights config not json", ["model.preset=musev", "model.weights_dir={inputs}/weights_bad_json"],
     r"unet\.json: not valid JSON"),
    ("size beyond memory", ["generation.height=100000", "generation.width=100000"],
     r"a 100000x100000 video of 1 x 12 frames needs about [\d.]+ GB .* is available .*; lower generation\.height/width"),
    ("length beyond memory", ["generation.num_frames=100000000"],
     r"1 x 100000000 frames needs about .*; lower generation\.num_frames or generation\.n_batch"),
    ("output dir a file", ["output.dir={inputs}/text.png/out"], r"output\.dir '.*text\.png/out' is not writable"),
    ("output exists", ["output.name=taken"], r"taken\.mp4 already exists; set output\.overwrite = true"),
    ("output locked", ["output.name=locked"], r"locked\.lock: another run \(pid \d+\) is writing outputs named 'locked'"),
    ("checkpoint_every negative", ["output.checkpoint_every=-1"], r"output\.checkpoint_every = -1 must be 0 \(after each shot"),
    ("resume without a checkpoint", ["--resume"], r"v\.checkpoint: no checkpoint to resume \(a run saves one with output\.checkpoint"),
    ("a new run over a checkpoint", ["output.name=interrupted", "output.checkpoint=true"],
     r"interrupted\.checkpoint holds an interrupted run of this name: continue it with --resume, or set output\.overwrite"),
    ("resume with other settings", ["output.name=interrupted", "generation.seed=5", "generation.steps=7", "--resume"],
     r"interrupted\.checkpoint was made with other settings: generation\.steps \(40 then, 7 now\); resume with the same"),
    ("resume a broken checkpoint", ["output.name=broken", "--resume"],
     r"broken\.checkpoint/state\.safetensors: not a readable checkpoint \(.*\); delete its folder to start over"),
    ("name 240 characters", ["output.name=" + "n" * 240],
     r"output\.name is too long for output\.dir '.*': the longest file name a run writes there, "
     r"'\.<output\.name>_sheet\.xxxxxxxx\.tmp\.png', would be 264 bytes and that file system allows \d+; set an "
     r"output\.name of at most \d+ bytes"),
    ("name 1000 characters", ["output.name=" + "n" * 1000], r"'\.<output\.name>_sheet\.xxxxxxxx\.tmp\.png', would be 1024 bytes"),
    ("--set nested 10,000 deep", ["output.formats=" + "[" * 10_000 + "]" * 10_000],
     r"--set output\.formats: arrays or tables are nested more than 32 levels deep; no setting or keypoint file"),
    ("--set nested 33 deep", ["output.formats=" + "[" * 32 + "]" * 32], r"--set output\.formats: .*more than 32 levels"),
    ("--set nested 32 deep: a type error", ["output.formats=" + "[" * 31 + "]" * 31],
     r"output\.formats must be a list of strings"),
    ("weights config nested deep", ["model.preset=musev", "model.weights_dir={inputs}/deep_unet_json"],
     r"deep_unet_json/unet\.json: arrays or tables are nested more than 32 levels deep"),
    ("output dir /dev/null", ["output.dir=/dev/null"],
     r"output\.dir '/dev/null' is not writable \(it is a character device, not a folder\); choose another folder"),
    ("output dir a symlink loop", ["output.dir={tmp}/loop"], r"output\.dir '.*loop' is not writable \(it is a symbolic link loop\)"),
    ("output dir inside a symlink loop", ["output.dir={tmp}/loop/out"],
     r"is not writable \(it passes through a symbolic link loop at .*loop\)"),
    ("a file named NAME.checkpoint", ["output.name=plain", "output.checkpoint=true"],
     r"plain\.checkpoint is a file, not a folder, so it holds no checkpoint of this run's name; move or delete it"),
    ("a file named NAME.checkpoint, overwrite", ["output.name=plain", "output.checkpoint=true", "output.overwrite=true"],
     r"plain\.checkpoint is a file, not a folder"),
    ("resume a file named NAME.checkpoint", ["output.name=plain", "--resume"], r"plain\.checkpoint is a file, not a folder"),
    ("resume latents of the wrong shape", ["output.name=misshapen", "generation.seed=5", "--resume"],
     r"resume state: latents is torch\.float32 \(1, 4, 5, 16, 12\); shot 0 of this call needs float32 \(1, 4, 12, 16, 12\); "
     r"resume with the settings and inputs that saved it"),
    ("resume metadata nested deep", ["output.name=deep", "--resume"],
     r"deep\.checkpoint/state\.safetensors: not a readable checkpoint \(fingerprint: arrays or tables are nested more "
     r"than 32 levels deep"),
]


def fingerprint_of(path, overrides: list[str], seed: int) -> dict:
    """The fingerprint a run of the config at `path` with `overrides` and `seed` gives its checkpoint (on the CPU)."""
    config = load_config(path, overrides)
    return fingerprint(config, seed, resolve_dtype(config.model.dtype, "cpu"))


@pytest.fixture
def config(tmp_path):
    """A valid tiny configuration writing to tmp_path/out; an output named "taken" and a lock of a running
    process on the name "locked" are already there."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken.mp4").write_bytes(b"an earlier video")
    (out / "locked.lock").write_text(f"{os.getppid()}\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[model]\npreset = "tiny"\n[input]\nimage = "{FACE}"\n[output]\ndir = "{out}"\nname = "v"\n')
    # a checkpoint an interrupted run of this config (seed 5, steps 40) left, and one that is not a checkpoint
    latent = torch.zeros(1, 4, 1, 2, 2)
    state = RunState(1, 0, latent, None, latent, torch.Generator().get_state(), 5)
    save_state(out / "interrupted.checkpoint" / "state.safetensors", state,
               fingerprint_of(path, ["generation.seed=5", "generation.steps=40"], 5))
    (out / "broken.checkpoint").mkdir()
    (out / "broken.checkpoint" / "state.safetensors").write_bytes(b"not safetensors")
    (out / "plain.checkpoint").write_text("a file of mine")
    # a checkpoint of this config (seed 5) whose latents do not fit the video (96x128: latents 16x12, 12 frames)
    condition = torch.zeros(1, 4, 1, 16, 12)
    misshapen = RunState(0, 1, condition, torch.zeros(1, 4, 5, 16, 12), condition, torch.Generator().get_state(), 5)
    save_state(out / "misshapen.checkpoint" / "state.safetensors", misshapen,
               fingerprint_of(path, ["generation.seed=5"], 5))
    (out / "deep.checkpoint").mkdir()
    tensors = {"condition": latent, "first_condition": latent.clone(), "generator": torch.Generator().get_state()}
    save_file(tensors, out / "deep.checkpoint" / "state.safetensors", metadata={
        "format": "musev_lite checkpoint 1", "shot": "0", "step": "0", "seed": "5", "fingerprint": "[" * 5000 + "]" * 5000})
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return path


@pytest.mark.parametrize("overrides, pattern", [slow_if(case, "length beyond memory") for case in RUN])
def test_run_command(config, inputs, capsys, overrides, pattern):
    before = files_in(config.parent)
    argv = [str(config)]
    for item in overrides:
        argv += [item] if item == "--resume" else ["--set", item.format(inputs=inputs, tmp=config.parent)]
    assert run.main(argv) == 2
    one_error_line(capsys.readouterr().err, pattern)
    assert files_in(config.parent) == before


CONFIG_FILES = [
    ("missing", None, "nowhere.toml", r"config file .*nowhere\.toml not found"),
    ("a folder", None, "empty_folder", r"config file .*empty_folder cannot be read \(.*Is a directory"),
    ("not UTF-8", None, "not_utf8.toml", r"config file .*not_utf8\.toml cannot be read \('utf-8' codec"),
    ("not TOML", None, "broken.toml", r"broken\.toml is not valid TOML: Expected ']'"),
    ("section not a table", "generation = 3\n", None, r"\[generation\] must be a table of keys"),
    ("unknown section", "[render]\nsteps = 3\n", None, r"unknown section \[render\]"),
    ("nan in TOML", '[model]\npreset = "tiny"\n[generation]\nguidance_scale = nan\n', None,
     r"generation\.guidance_scale = nan must be a finite number"),
    ("image relative to the file", '[model]\npreset = "tiny"\n[input]\nimage = "pictures/face.png"\n', None,
     r"image .*pictures/face\.png: no such file \(input\.image = 'pictures/face\.png' is relative to the config "
     r"file's folder, "),
    ("lora relative to the file", '[model]\npreset = "tiny"\n[[model.lora]]\npath = "style.safetensors"\n', None,
     r"model\.lora\[0\]\.path: .*style\.safetensors: no such file \(model\.lora\[0\]\.path = 'style\.safetensors' is "
     r"relative to the config file's folder"),
    ("empty: default weights missing", "", None, r"model\.weights_dir 'weights/musev_referencenet' lacks unet\.safetensors"),
    ("a path holding a NUL", '[input]\nface_embedding = "face\\u0000.npy"\n', None,
     r"input\.face_embedding = 'face\\x00\.npy' holds a NUL character, which no file path can hold"),
    ("TOML nested 40 deep", '[output]\nformats = ' + "[" * 40 + "]" * 40 + "\n", None,
     r"config file .*c\.toml: arrays or tables are nested more than 32 levels deep"),
    ("TOML nested 10,000 deep", '[output]\nformats = ' + "[" * 10_000 + "]" * 10_000 + "\n", None,
     r"config file .*c\.toml: arrays or tables are nested more than 32 levels deep"),
    ("config name too long for the default output name", None, "c" * 250 + ".toml",
     r"the output name c{250}-<seed> \(from the config file's name\) is too long for output\.dir 'outputs': .* would be "
     r"\d+ bytes and that file system allows \d+; set an output\.name of at most \d+ bytes"),
]


@pytest.mark.parametrize("text, existing, pattern", [case[1:] for case in CONFIG_FILES], ids=[c[0] for c in CONFIG_FILES])
def test_configuration_file(tmp_path, inputs, capsys, monkeypatch, text, existing, pattern):
    monkeypatch.chdir(tmp_path)  # defaults (outputs/, weights/...) land here
    path = inputs / existing if existing else tmp_path / "c.toml"
    if text is not None:
        path.write_text(text)
    before = files_in(tmp_path)
    assert run.main([str(path)]) == 2
    one_error_line(capsys.readouterr().err, pattern)
    assert files_in(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# The Python API: MuseVPipeline calls


@pytest.fixture(scope="module")
def pipe():
    return MuseVPipeline.demo(seed=0)


SMALL = dict(num_frames=2, steps=1, context_frames=4, context_overlap=2)
MISSING_BACKEND = "mps" if torch.cuda.is_available() else "cuda"  # no torch build has both


def state(**changes) -> RunState:
    """A resume state a SMALL call with FACE (96x128: latents 16x12) could have saved after step 0 of shot 0,
    with `changes`."""
    condition = torch.zeros(1, 4, 1, 16, 12)
    fields = dict(shot=0, step=0, condition=condition, latents=torch.zeros(1, 4, 2, 16, 12), first_condition=condition,
                  generator=torch.Generator().get_state(), seed=1)
    return RunState(**{**fields, **changes})
API = [
    ("image a number", lambda p, d: p("x", 123, **SMALL), r"image array must be uint8 \(H, W, 3\), got int64 \(\)"),
    ("image 2-D", lambda p, d: p("x", np.zeros((16, 16), np.uint8), **SMALL), r"must be uint8 \(H, W, 3\), got uint8 \(16, 16\)"),
    ("image float", lambda p, d: p("x", np.zeros((16, 16, 3)), **SMALL), r"got float64 \(16, 16, 3\)"),
    ("image missing", lambda p, d: p("x", d / "nowhere.png", **SMALL), r"image .*nowhere\.png: no such file"),
    ("refer image unreadable", lambda p, d: p("x", FACE, refer_image=d / "text.png", **SMALL), r"text\.png: not a readable image"),
    ("prompt a number", lambda p, d: p(123, FACE, **SMALL), r"^prompt must be a string, got int 123"),
    ("negative prompt a number", lambda p, d: p("x", FACE, negative_prompt=3, **SMALL), r"negative_prompt must be a string, got int"),
    ("config a string", lambda p, d: p("x", FACE, "V2"), r"config must be a GenerationConfig or None, got str 'V2'; give settings as keywords"),
    ("unknown setting", lambda p, d: p("x", FACE, stepz=1), r"unknown generation setting 'stepz'; did you mean 'steps'\?"),
    ("steps 0", lambda p, d: p("x", FACE, steps=0), r"generation\.steps = 0 must be at least 1"),
    ("lcm steps 60", lambda p, d: p("x", FACE, sampler="lcm", steps=60), r"generation\.steps = 60 is more than the 'lcm' sampler"),
    ("guidance nan", lambda p, d: p("x", FACE, guidance_scale=float("nan"), **SMALL), r"guidance_scale = nan must be a finite number"),
    ("size beyond memory", lambda p, d: p("x", FACE, height=80000, width=80000, **SMALL), r"a 80000x80000 video .* needs about"),
    ("window batch 0", lambda p, d: p("x", FACE, window_batch=0, **SMALL), r"window_batch = 0 must be at least 1"),
    ("output type", lambda p, d: p("x", FACE, output_type="np", **SMALL), r"output_type = 'np': use one of uint8, pil"),
    ("prompt embeds shape", lambda p, d: p("x", FACE, prompt_embeds=torch.zeros(1, 3, 5), **SMALL),
     r"prompt_embeds must be \(1, tokens, 32\); got \(1, 3, 5\)"),
    ("negative embeds alone", lambda p, d: p("x", FACE, negative_prompt_embeds=torch.zeros(1, 77, 32), **SMALL),
     r"negative_prompt_embeds given without prompt_embeds"),
    ("condition latents shape", lambda p, d: p("x", None, condition_latents=torch.zeros(1, 4, 2, 2), **SMALL),
     r"condition_latents have shape \(1, 4, 2, 2\); this call needs \(1, 4, 1, 2, 2\)"),
    ("seed text", lambda p, d: p("x", FACE, seed="1", **SMALL), r"generation\.seed must be an integer; got '1'"),
    ("generator text", lambda p, d: p("x", FACE, generator="g", **SMALL), r"generator must be a torch\.Generator, got str"),
    ("unfitted image", lambda p, d: p("x", FACE, fit_images=False, height=64, width=64, **SMALL),
     r"image is 96x128 but the video is 64x64; pass fit_images=True"),
    ("weights folder missing", lambda p, d: MuseVPipeline.from_pretrained(d / "nowhere"), r"nowhere: missing unet\.safetensors"),
    ("device unknown", lambda p, d: MuseVPipeline.demo(device="bogus"), r"device = 'bogus' is not a torch device"),
    ("LoRA missing", lambda p, d: p.load_loras([(d / "nowhere.safetensors", 1.0)]), r"nowhere\.safetensors: no such file"),
    ("embedding too narrow", lambda p, d: p.load_textual_inversion(d / "narrow_embedding.safetensors"),
     r"embedding vectors do not fit this text encoder \(width 7, expected 32\)"),
    ("to a backend torch lacks", lambda p, d: p.to(MISSING_BACKEND),
     rf"device = '{MISSING_BACKEND}' but this torch has no {MISSING_BACKEND.upper()} device; use \"auto\" or one of cpu"),
    ("to float64", lambda p, d: p.to(torch.float64), r"dtype = torch\.float64 is not one of auto, float32, bfloat16, float16"),
    ("to (dtype, device)", lambda p, d: p.to(torch.float16, "cpu"), r"to\(\) takes \(device\), \(dtype\) or \(device, dtype\)"),
    ("to dtype twice", lambda p, d: p.to("cpu", torch.float32, dtype=torch.float32), r"to\(\): dtype given twice"),
    ("torch_dtype a name torch lacks", lambda p, d: MuseVPipeline.from_pretrained(d / "demo_weights", torch_dtype="float64"),
     r"torch_dtype = 'float64' is not one of auto, float32, bfloat16, float16"),
    ("torch_dtype a number", lambda p, d: MuseVPipeline.from_pretrained(d / "demo_weights", torch_dtype=16),
     r"torch_dtype = 16 is not one of auto, float32"),
    ("ControlNet narrower than the UNet", lambda p, d: MuseVPipeline.from_pretrained(d / "narrow_controlnet"),
     r"narrow_controlnet/controlnet\.json: block_out_channels = \(16, 16, 16, 16\) but the UNet's block_out_channels is "
     r"\(32, 32, 32, 32\) \(unet\.json\), and its residuals are added to the UNet's skip connections; controlnet was made "
     r"for another base model"),
    ("ControlNet of another text width", lambda p, d: MuseVPipeline.from_pretrained(d / "wide_text_controlnet"),
     r"controlnet\.json: cross_attention_dim = 64 but the UNet's cross_attention_dim is 32 \(unet\.json\), and it reads "
     r"the same text embeddings as the UNet"),
    ("scheduler.json nested deep", lambda p, d: MuseVPipeline.from_pretrained(d / "deep_scheduler"),
     r"deep_scheduler/scheduler\.json: arrays or tables are nested more than 32 levels deep"),
    ("LoRA pair with a word for a scale", lambda p, d: p.load_loras([(d / "nowhere.safetensors", "strong")]),
     r"loras\[0\] = .* must be a path or a \(path, scale\) pair"),
    ("LoRA a number", lambda p, d: p.load_loras(5), r"loras must be a path or a list of \(path, scale\) pairs; got int"),
    ("LoRA one path, missing", lambda p, d: p.load_loras(str(d / "nowhere.safetensors")), r"nowhere\.safetensors: no such file"),
    ("textual-inversion word a path", lambda p, d: p.load_textual_inversion(d / "embedding.safetensors", word="../evil"),
     r"textual-inversion word = '\.\./evil' must be a file stem, not a path"),
    ("control not a ControlVideo", lambda p, d: p("x", FACE, control=[np.zeros((3, 8, 8, 3), np.uint8)], **SMALL),
     r"control\[0\] must be a ControlVideo\(frames, controlnet, scale\), got ndarray"),
    ("resume latents of the wrong shape", lambda p, d: p("x", FACE, resume=state(latents=torch.zeros(1, 4, 3, 16, 12)), **SMALL),
     r"resume state: latents is torch\.float32 \(1, 4, 3, 16, 12\); shot 0 of this call needs float32 \(1, 4, 2, 16, 12\); "
     r"resume with the settings and inputs that saved it"),
    ("resume latents bfloat16", lambda p, d: p("x", FACE, resume=state(latents=torch.zeros(1, 4, 2, 16, 12).bfloat16()), **SMALL),
     r"latents is torch\.bfloat16 \(1, 4, 2, 16, 12\); shot 0 of this call needs float32"),
    ("resume condition of another size", lambda p, d: p("x", FACE, resume=state(condition=torch.zeros(1, 4, 1, 8, 8)), **SMALL),
     r"resume state: condition is torch\.float32 \(1, 4, 1, 8, 8\); shot 0 of this call needs float32 \(1, 4, 1, 16, 12\)"),
    ("resume generator state cut", lambda p, d: p("x", FACE, resume=state(generator=torch.zeros(100, dtype=torch.uint8)), **SMALL),
     r"resume state: generator state is \(100,\), not torch's uint8 \(\d+,\) of a CPU generator"),
    ("resume shot out of range", lambda p, d: p("x", FACE, resume=state(shot=7), **SMALL),
     r"resume state: shot = 7, but this call has shots 0\.\.0 \(and 1: all done\)"),
    ("resume step beyond the steps", lambda p, d: p("x", FACE, resume=state(step=5), **SMALL),
     r"resume state: step = 5, but this call has 1 steps per shot"),
]


@pytest.mark.parametrize("call, pattern", [slow_if(case, "scheduler.json nested deep") for case in API])
def test_python_api(pipe, inputs, tmp_path, monkeypatch, call, pattern):
    monkeypatch.chdir(tmp_path)
    before = files_in(inputs)
    with pytest.raises(ValueError, match=pattern) as caught:
        call(pipe, inputs)
    assert "\n" not in str(caught.value)
    assert files_in(inputs) == before and files_in(tmp_path) == {}


# ---------------------------------------------------------------------------------------------
# Converters and fetch: command lines that write a weights folder


CONVERT = [
    ("sd15 source missing", convert_sd15, ["{inputs}/nowhere", "{dest}"], r"nowhere: no such file"),
    ("sd15 unreadable safetensors", convert_sd15, ["{inputs}/garbage.safetensors", "{dest}"], r"not a readable safetensors file"),
    ("sd15 empty file", convert_sd15, ["{inputs}/empty.safetensors", "{dest}"], r"empty\.safetensors: not a readable safetensors"),
    ("sd15 pickle with code", convert_sd15, ["{inputs}/code.ckpt", "{dest}"], r"code\.ckpt: refused to unpickle"),
    ("sd15 empty folder", convert_sd15, ["{inputs}/empty_folder", "{dest}"], r"empty_folder/unet: missing folder"),
    ("sd15 an image", convert_sd15, ["{inputs}/text.png", "{dest}"], r"unknown checkpoint type '\.png'"),
    ("sd15 not SD1.5", convert_sd15, ["{inputs}/other.safetensors", "{dest}"], r"no model\.diffusion_model\.\* keys"),
    ("sd15 bad dtype", convert_sd15, ["{inputs}/other.safetensors", "{dest}", "--dtype", "int8"],
     r"argument --dtype: invalid choice: 'int8'"),
    ("musev motion missing", convert_musev, ["{dest}", "--motion", "{inputs}/nowhere", "--base", "{inputs}/empty_folder"],
     r"--motion .*nowhere: no such folder"),
    ("musev base missing", convert_musev, ["{dest}", "--motion", "{inputs}/empty_folder", "--base", "{inputs}/nowhere",
                                           "--preset", "musev"], r"nowhere: no such file"),
    ("musev model unknown", convert_musev, ["{dest}", "--motion", "{inputs}/empty_folder", "--base", "{inputs}/empty_folder"],
     r"cannot tell the model from 'empty_folder'; pass --preset"),
    ("musev no motion", convert_musev, ["{dest}"], r"the following arguments are required: --motion, --base"),
    ("controlnet missing", convert_controlnet, ["{inputs}/nowhere", "--dest", "{dest}"], r"nowhere: no such file"),
    ("controlnet not one", convert_controlnet, ["{inputs}/other.safetensors", "--dest", "{dest}"],
     r"no input_hint_block\.\* keys .*is this a ControlNet\?"),
    ("controlnet empty folder", convert_controlnet, ["{inputs}/empty_folder", "--dest", "{dest}"],
     r"empty_folder: no weights file"),
    ("controlnet pickle with code", convert_controlnet, ["{inputs}/code.ckpt", "--dest", "{dest}"], r"refused to unpickle"),
    ("controlnet dest a file", convert_controlnet, ["{inputs}/controlnet_folder", "--dest", "{inputs}/text.png"],
     r"--dest .*text\.png is a file, not a folder; give a folder \(it is made if missing\)"),
    ("sd15 dest a file", convert_sd15, ["{inputs}/other.safetensors", "{inputs}/text.png"], r"dest .*text\.png is a file, not a folder"),
    ("musev dest inside a file", convert_musev, ["{inputs}/text.png/w", "--motion", "{inputs}/empty_folder", "--base",
                                                "{inputs}/empty_folder"], r"dest .*text\.png/w is inside .*text\.png, which is a file"),
    ("controlnet dest a device", convert_controlnet, ["{inputs}/controlnet_folder", "--dest", "/dev/null"],
     r"--dest /dev/null is a character device, not a folder"),
]


def run_command(main, argv) -> tuple[int, str]:
    try:
        return main(argv), ""
    except SystemExit as stop:  # argparse
        return stop.code, ""


@pytest.mark.parametrize("module, argv, pattern", [case[1:] for case in CONVERT], ids=[case[0] for case in CONVERT])
def test_converters(inputs, tmp_path, capsys, module, argv, pattern):
    dest = tmp_path / "weights"
    code, _ = run_command(module.main, [a.format(inputs=inputs, dest=dest) for a in argv])
    assert code == 2
    one_error_line(capsys.readouterr().err, pattern)
    assert not dest.exists()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A local web server that has no file (every request 404), and a port nothing listens on."""
    empty = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(empty))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    yield f"http://127.0.0.1:{server.server_port}", f"http://127.0.0.1:{closed}"
    server.shutdown()


FETCH = [
    ("unknown model", ["musev9"], r"argument model: invalid choice: 'musev9'"),
    ("unknown base", ["musev", "--base", "sd21"], r"argument --base: invalid choice: 'sd21'"),
    ("nothing listens", ["musev", "--base-url", "{closed}"], r"127\.0\.0\.1:\d+/motion/musev/unet/config\.json: cannot connect"),
    ("file not on the server", ["musev", "--base-url", "{empty}"], r"/motion/musev/unet/config\.json: HTTP 404"),
    ("ControlNet URL not a URL", ["musev", "--controlnet", "--controlnet-url", "lllyasviel"],
     r"--controlnet-url 'lllyasviel' is not a URL"),
    ("not a URL", ["musev", "--base-url", "huggingface.co/TMElyralab"], r"--base-url 'huggingface\.co/TMElyralab' is not a URL"),
    ("ftp", ["musev", "--base-url", "ftp://127.0.0.1/x"], r"--base-url 'ftp://127\.0\.0\.1/x' is not a URL"),
]


@pytest.mark.parametrize("argv, pattern", [case[1:] for case in FETCH], ids=[case[0] for case in FETCH])
def test_fetch(servers, tmp_path, capsys, argv, pattern):
    empty, closed = servers
    downloads, dest = tmp_path / "checkpoints", tmp_path / "weights"
    argv = [a.format(empty=empty, closed=closed) for a in argv] + ["--downloads", str(downloads), "--dest", str(dest)]
    code, _ = run_command(fetch.main, argv)
    assert code == 2
    one_error_line(capsys.readouterr().err, pattern)
    assert not downloads.exists() and not dest.exists()  # not even empty folders


# ---------------------------------------------------------------------------------------------
# Media and side files read by functions: images, videos, keypoint JSON, LoRA files

READERS = [
    ("image empty", video_io.read_image, "empty.png", {}, r"empty\.png: not a readable image \(cannot identify"),
    ("image text", video_io.read_image, "text.png", {}, r"text\.png: not a readable image"),
    ("image folder", video_io.read_image, "folder.png", {}, r"folder\.png: is a folder, not an image file"),
    ("image truncated", video_io.read_image, "truncated.png", {}, r"image file is truncated"),
    ("image negative 32-bit", video_io.read_image, "negative.tiff", {}, r"mode I values must lie in 0\.\.65535, found -5"),
    ("image bomb", video_io.read_image, "bomb.png", {}, r"exceeds limit .*decompression bomb"),
    ("video empty", video_io.read_video, "empty.mp4", {}, r"video .*empty\.mp4: not a readable video"),
    ("video text", video_io.read_video, "text.png", {}, r"video .*text\.png: no frame could be decoded"),
    ("video folder", video_io.read_video, "empty_folder", {}, r"empty_folder: is a folder, not a video file"),
    ("video missing", video_io.read_video, "nowhere.mp4", {}, r"nowhere\.mp4: no such file"),
    ("video sound only", video_io.read_video, "sound.wav", {}, r"sound\.wav: the file has no video stream"),
    ("video truncated", video_io.read_video, "truncated.mp4", {}, r"truncated\.mp4: not a readable video"),
    ("video fps 0", video_io.read_video, "video.mp4", {"fps": 0}, r"fps must be a positive number, got 0"),
    ("video sample rate 0", video_io.read_video, "video.mp4", {"sample_rate": 0}, r"sample_rate must be an integer >= 1"),
    ("video height only", video_io.read_video, "video.mp4", {"height": 8}, r"give both height and width, or neither"),
    ("keypoints not JSON", pose.read_keypoints, "kp_bad.json", {}, r"kp_bad\.json: not valid JSON"),
    ("keypoints not UTF-8", pose.read_keypoints, "kp_binary.json", {}, r"kp_binary\.json: not valid JSON \('utf-8'"),
    ("keypoints empty list", pose.read_keypoints, "kp_empty_list.json", {}, r"non-empty list of frames, got an empty list"),
    ("keypoints a number", pose.read_keypoints, "kp_number.json", {}, r"non-empty list of frames, got int"),
    ("keypoints people text", pose.read_keypoints, "kp_people_text.json", {}, r"no \"people\" list"),
    ("keypoints no fields", pose.read_keypoints, "kp_no_fields.json", {}, r"people\[0\] has none of pose_keypoints_2d"),
    ("keypoints three numbers", pose.read_keypoints, "kp_three_numbers.json", {}, r"has 3 numbers; expected 54 \(18 points\)"),
    ("keypoints nan", pose.read_keypoints, "kp_nan.json", {}, r"pose_keypoints_2d holds a non-finite number"),
    ("keypoints pixels no canvas", pose.read_keypoints, "kp_pixels.json", {}, r"pixel coordinates but no canvas size"),
    ("keypoints canvas negative", pose.read_keypoints, "kp_canvas.json", {}, r"canvas_height / canvas_width must both be positive"),
    ("keypoints strings", pose.read_keypoints, "kp_strings.json", {}, r"must be a list of numbers x, y, confidence"),
    ("keypoints empty folder", pose.read_keypoints, "empty_folder", {}, r"keypoint folder .*: no \*\.json files in it"),
    ("keypoints missing", pose.read_keypoints, "nowhere.json", {}, r"nowhere\.json: no such file or folder"),
    ("keypoints canvas argument", pose.read_keypoints, "kp_pixels.json", {"canvas": (0, 5)}, r"canvas must be \(height, width\)"),
    ("LoRA without tensors", lora.load_lora, "no_tensors.safetensors", {}, r"no LoRA weights in the file \(it is empty\)"),
    ("LoRA empty file", lora.load_lora, "empty.safetensors", {}, r"not a readable safetensors file"),
    ("LoRA other keys", lora.load_lora, "other.safetensors", {}, r"1 key\(s\) are not LoRA weights of a known format: a\."),
    ("LoRA down without up", lora.load_lora, "half_lora.safetensors", {}, r"1 layer\(s\) lack a matching lora down/up pair"),
    ("LoRA NaN alpha", lora.load_lora, "nan_lora.safetensors", {}, r"1 tensor\(s\) hold NaN or infinite values"),
    ("LoRA for SDXL", lora.load_lora, "sdxl_lora.safetensors", {}, r"this LoRA was made for SDXL"),
    ("LoRA pickle with code", lora.load_lora, "code.ckpt", {}, r"refused to unpickle"),
    ("LoRA a text file", lora.load_lora, "bad.json", {}, r"unknown checkpoint type '\.json'"),
    ("keypoints far out (x 1e300)", pose.read_keypoints, "kp_huge.json", {},
     r"kp_huge\.json: people\[0\]\.pose_keypoints_2d has a point at x, y = 1e\+298, 0\.05 canvas sizes, beyond the 100 "
     r"canvas sizes a point may lie from the picture"),
    ("keypoints nested 100,000 deep", pose.read_keypoints, "kp_deep.json", {},
     r"keypoints .*kp_deep\.json: arrays or tables are nested more than 32 levels deep"),
    ("LoRA rank 0", lora.load_lora, "rank0_lora.safetensors", {},
     r"1 layer\(s\) have empty down/up factors \(rank 0, .*\): lora_unet_down_blocks_0_attentions_0_proj_in "
     r"\{'down': \(0, 320\), 'up': \(320, 0\)\}"),
    ("LoRA metadata nested deep", lora.load_lora, "deep_metadata_lora.safetensors", {},
     r"deep_metadata_lora\.safetensors: lora_adapter_metadata: arrays or tables are nested more than 32 levels deep"),
]


@pytest.mark.parametrize("read, name, kwargs, pattern", [case[1:] for case in READERS], ids=[case[0] for case in READERS])
def test_readers(inputs, read, name, kwargs, pattern):
    before = files_in(inputs)
    with pytest.raises(ValueError, match=pattern) as caught:
        read(inputs / name, **kwargs)
    assert "\n" not in str(caught.value)
    assert files_in(inputs) == before


# ---------------------------------------------------------------------------------------------
# Names that would leave their folder, and the forms the Python API accepts besides the documented one


@pytest.mark.parametrize("name", ["../../escaped", "../escaped", "a/b", "a\\b", "..", ".hidden", ""])
def test_converter_names_cannot_leave_dest(inputs, tmp_path, capsys, name):
    dest = tmp_path / "a" / "weights"  # ../../escaped would be tmp_path/escaped.safetensors
    code = convert_controlnet.main([str(inputs / "controlnet_folder"), "--dest", str(dest), "--name", name])
    assert code == 2
    one_error_line(capsys.readouterr().err, r"--name = .* must (be a file stem, not a path|not start with a dot|"
                                            r"be a non-empty name)")
    assert files_in(tmp_path) == {} and not (tmp_path.parent / "escaped.safetensors").exists()


def test_converter_writes_a_plain_name(inputs, tmp_path):
    """The source of test_converter_names_cannot_leave_dest converts: only the name was refused there."""
    dest = tmp_path / "a" / "weights"
    assert convert_controlnet.main([str(inputs / "controlnet_folder"), "--dest", str(dest), "--name", "pose"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["pose.json", "pose.safetensors"]


@pytest.mark.parametrize("part", ["controlnet", "textual inversion"])
def test_save_pretrained_refuses_names_that_leave_the_folder(tmp_path, part):
    pipe = MuseVPipeline.demo(seed=0)
    if part == "controlnet":
        pipe.controlnets["../escaped"] = pipe.controlnets.pop("controlnet")
    else:
        pipe.textual_inversions["../escaped"] = torch.zeros(1, 32)
    with pytest.raises(ValueError, match=r"(ControlNet name|textual-inversion word) = '\.\./escaped' must be a file stem"):
        pipe.save_pretrained(tmp_path / "w" / "embeddings")
    assert files_in(tmp_path) == {}  # checked before anything is written


@pytest.mark.slow
def test_to_and_from_pretrained_take_what_diffusers_takes(inputs):
    pipe = MuseVPipeline.demo(seed=0)
    assert pipe.to("cpu").device.type == "cpu" and pipe.dtype == torch.float32
    assert pipe.to(torch.bfloat16).dtype == torch.bfloat16 and pipe.vae.decoder.conv_out.weight.dtype == torch.float32
    assert pipe.to("cpu", torch.float32).dtype == torch.float32
    assert pipe.to(device="cpu", dtype="bfloat16").dtype == torch.bfloat16
    assert pipe.to(torch.device("cpu"), dtype=torch.float16).dtype == torch.float16
    assert pipe.controlnets["controlnet"].conv_in.weight.dtype == torch.float16
    for given, dtype in (("float16", torch.float16), ("torch.bfloat16", torch.bfloat16), (torch.float16, torch.float16)):
        assert MuseVPipeline.from_pretrained(inputs / "demo_weights", torch_dtype=given).dtype == dtype


def test_load_loras_takes_one_path_at_scale_1(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "style.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.randn(2, 32), f"{key}.lora_up.weight": torch.randn(32, 2)}, path)
    pipe = MuseVPipeline.demo(seed=0)
    weight = pipe.unet.down_blocks[0].attentions[0].proj_in.weight
    original = weight.clone()
    pipe.load_loras(str(path))
    one_path = weight.clone()
    pipe.unload_loras()
    pipe.load_loras([(path, 1.0)])
    assert not torch.equal(one_path, original) and torch.equal(one_path, weight)
    assert pipe.loras == [(str(path), 1.0)]


def test_control_takes_one_control_video(pipe):
    frames = np.random.default_rng(0).integers(0, 256, (3, 128, 96, 3), dtype=np.uint8)
    one = pipe("x", FACE, control=ControlVideo(frames, "controlnet", 0.5), seed=2, **SMALL)
    listed = pipe("x", FACE, control=[ControlVideo(frames, "controlnet", 0.5)], seed=2, **SMALL)
    without = pipe("x", FACE, seed=2, **SMALL)
    assert torch.equal(one.latents, listed.latents) and not torch.equal(one.latents, without.latents)


def test_a_negative_prompt_named_like_a_preset_warns(pipe):
    with pytest.warns(UserWarning, match=r"negative_prompt 'V9' looks like a preset name but is none \(Empty, V1, V2, V3, "
                                         r"V4, V5\), so it is used as literal text"):
        pipe.encode_text("x", "V9")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.encode_text("x", "V2")
        pipe.encode_text("x", "blurry, V9 quality")
    assert not [w for w in caught if "preset" in str(w.message)]


# ---------------------------------------------------------------------------------------------
# Output names against the file system's limit, and a full disk


def tiny_config(tmp_path, *lines) -> Path:
    """A fast run (2 shots of 2 frames, one step, float32) writing to tmp_path/out, plus `lines` of TOML."""
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join([
        "[model]", 'preset = "tiny"', 'dtype = "float32"', "[input]", f'image = "{FACE}"',
        "[generation]", "num_frames = 2", "n_batch = 2", "steps = 1", "context_frames = 4", "context_overlap = 2",
        "seed = 3", "[output]", f'dir = "{tmp_path / "out"}"', 'name = "v"', *lines, ""]))
    return path


def test_the_longest_accepted_name_writes_every_file(tmp_path, capsys, monkeypatch):
    """The limit the refusal states is the real one: a name of that length goes through a stale lock taken over,
    an interrupt that keeps partial outputs and a checkpoint, and a resume that writes every format and the sheet
    (with their temporaries); one byte more is refused before anything is written."""
    config = tiny_config(tmp_path, 'formats = ["mp4", "gif", "webp", "png"]', "checkpoint = true")
    assert run.main([str(config), "--set", "output.name=" + "n" * 1000]) == 2
    longest = int(re.search(r"at most (\d+) bytes", capsys.readouterr().err)[1])
    name, out = "n" * longest, tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / f"{name}.lock").write_text(f"{gone.pid}\n")

    def stop_in_shot_2(self, progress):
        if progress.stage == "video" and progress.shot == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(run.ProgressPrinter, "__call__", stop_in_shot_2)
    assert run.main([str(config), "--set", f"output.name={name}"]) == 130
    assert sorted(p.name.removeprefix(name) for p in out.iterdir()) == [".checkpoint", ".partial.mp4", "_frames.partial"]
    monkeypatch.undo()
    assert run.main([str(config), "--set", f"output.name={name}", "--resume"]) == 0
    assert sorted(p.name.removeprefix(name) for p in out.iterdir()) == [".gif", ".json", ".mp4", ".webp", "_frames",
                                                                       "_sheet.png"]
    capsys.readouterr()
    assert run.main([str(config), "--set", f"output.name={name}n"]) == 2
    one_error_line(capsys.readouterr().err, rf"would be {longest + 1 + 24} bytes and that file system allows {longest + 24}")


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_on_call(monkeypatch, owner, name, call=1, partial=None, error=enospc, when=lambda *a, **k: True):
    """Make `owner.name` fail as a full disk on its `call`-th call that `when` accepts, after `partial(*args)` wrote
    the part of the file that fitted; other calls go through."""
    original, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        if when(*args, **kwargs):
            calls.append(args)
            if len(calls) == call:
                if partial is not None:
                    partial(*args)
                error()
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, failing)


class FullFile:
    """A file (from os.fdopen) on a full disk: writing fails."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        enospc()


def safetensors_full():
    from safetensors import SafetensorError
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


PARTIAL = b"x" * 999  # what fitted of a file: the message must count it (measured before it is removed)
FULL_DISK = [  # (what fills the disk, formats, the file named, written: "999 bytes" when exactly PARTIAL, install)
    ("lock file", ["mp4"], r"v\.lock", "0 bytes",
     lambda m: m.setattr(os, "fdopen", lambda fd, *a, _open=os.fdopen, **k: FullFile(_open(fd, *a, **k)))),
    ("mp4 encoder, shot 2", ["mp4"], r"v\.mp4", r"[\d.]+ (bytes|kB)",
     lambda m: fail_on_call(m, video_io.Mp4Writer, "write", call=2)),
    ("mp4 finish", ["mp4"], r"v\.mp4", r"[\d.]+ (bytes|kB)",
     lambda m: fail_on_call(m, video_io.Mp4Writer, "close", partial=lambda writer: writer.abort())),
    ("PNG frame 2", ["png"], r"v_frames", r"[\d.]+ kB",
     lambda m: fail_on_call(m, Image.Image, "save", call=2, partial=lambda image, f, *a: f.write(PARTIAL))),
    ("GIF", ["gif"], r"v\.gif", "999 bytes",
     lambda m: fail_on_call(m, Image.Image, "save", partial=lambda image, path, *a: path.write_bytes(PARTIAL))),
    ("WebP", ["webp"], r"v\.webp", "999 bytes",
     lambda m: fail_on_call(m, Image.Image, "save", partial=lambda image, path, *a: path.write_bytes(PARTIAL))),
    ("contact sheet", ["mp4"], r"v_sheet\.png", "999 bytes",
     lambda m: fail_on_call(m, Image.Image, "save", partial=lambda image, path, *a: path.write_bytes(PARTIAL))),
    ("sidecar JSON", ["mp4"], r"v\.json", "999 bytes",
     lambda m: fail_on_call(m, Path, "write_text", partial=lambda path, *a: path.write_bytes(PARTIAL))),
]


@pytest.mark.parametrize("formats, name, written, install", [c[1:] for c in FULL_DISK], ids=[c[0] for c in FULL_DISK])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, formats, name, written, install):
    config = tiny_config(tmp_path, f"formats = {json.dumps(formats)}")
    install(monkeypatch)
    assert run.main([str(config)]) == 2
    out = tmp_path / "out"
    one_error_line(capsys.readouterr().err, rf"^error: {re.escape(str(out))}: no space left on the device while writing "
                                            rf"{name} \([\d.]+ (bytes|kB|MB|GB) free, {written} written when it filled\); "
                                            r"the partial files are removed; free some space or choose another output\.dir$")
    assert list(out.iterdir()) == []  # no output, partial file, temporary, staging folder or lock


def test_a_full_disk_while_saving_the_first_state_leaves_no_checkpoint(tmp_path, capsys, monkeypatch):
    from musev_lite import checkpoint
    fail_on_call(monkeypatch, checkpoint, "save_file", partial=lambda tensors, path, **k: path.write_bytes(PARTIAL),
                 error=safetensors_full)
    assert run.main([str(tiny_config(tmp_path, "checkpoint = true"))]) == 2
    one_error_line(capsys.readouterr().err, r"out: no space left on the device while writing v\.checkpoint/state\.safetensors "
                                            r"\([\d.]+ \S+ free, it needs about [\d.]+ kB\); the partial files are removed")
    assert list((tmp_path / "out").iterdir()) == []  # no state was whole: no checkpoint


@pytest.mark.slow
def test_a_full_disk_keeps_a_whole_checkpoint_that_resumes(tmp_path, capsys, monkeypatch):
    """The first shot's latents cannot be saved: the state saved before stays, whole, and the command the
    error gives continues to the video an uninterrupted run writes, byte for byte."""
    from musev_lite import checkpoint
    fail_on_call(monkeypatch, checkpoint, "save_file", partial=lambda tensors, path, **k: path.write_bytes(PARTIAL),
                 error=safetensors_full, when=lambda tensors, *a, **k: list(tensors) == ["latents"])
    config = tiny_config(tmp_path, "checkpoint = true")
    assert run.main([str(config)]) == 2
    err = capsys.readouterr().err
    one_error_line(err, r"while writing v\.checkpoint/shot_00000\.safetensors .*; v\.checkpoint keeps the last saved step: "
                        r"once there is room, continue with: python -m musev_lite\.run .*tiny\.toml --resume$")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["v.checkpoint"]
    assert sorted(p.name for p in (out / "v.checkpoint").iterdir()) == ["state.safetensors"]  # no temporary
    monkeypatch.undo()
    command = shlex.split(err.split("continue with: ")[1])
    assert command[:3] == ["python", "-m", "musev_lite.run"] and run.main(command[3:]) == 0
    assert run.main([str(config), "--set", f"output.dir={tmp_path / 'whole'}"]) == 0
    assert (out / "v.mp4").read_bytes() == (tmp_path / "whole/v.mp4").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["v.json", "v.mp4", "v_sheet.png"]


def test_a_full_disk_in_a_converter(inputs, tmp_path, capsys, monkeypatch):
    from musev_lite import weights
    fail_on_call(monkeypatch, weights, "save_file", partial=lambda tensors, path, **k: path.write_bytes(PARTIAL),
                 error=safetensors_full)
    dest = tmp_path / "weights"
    assert convert_controlnet.main([str(inputs / "controlnet_folder"), "--dest", str(dest)]) == 2
    one_error_line(capsys.readouterr().err, rf"{re.escape(str(dest))}: no space left on the device while writing "
                                            r"controlnet\.safetensors \([\d.]+ \S+ free, it needs about [\d.]+ kB\); the "
                                            r"partial files are removed; free some space or write to another folder$")
    assert files_in(tmp_path) == {}


@pytest.fixture
def small_disk(tmp_path):
    """make(size) -> a folder on a tmpfs of that size, unmounted after the test; skipped where this process
    may not mount one (not root, in a container without the right), the fault-injection tests covering the
    same code there."""
    mounted = []

    def make(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("formats, size", [(["mp4"], "4k"), (["mp4"], "24k"), (["mp4"], "60k"), (["png"], "60k"),
                                           (["gif"], "60k"), (["webp"], "24k")])
def test_a_real_full_disk(tmp_path, capsys, small_disk, formats, size):
    """A tmpfs too small for the outputs, at sizes that fill it in different writes."""
    disk = small_disk(size)
    config = tiny_config(tmp_path, f"formats = {json.dumps(formats)}")
    assert run.main([str(config), "--set", f"output.dir={disk}"]) == 2
    one_error_line(capsys.readouterr().err, rf"{re.escape(str(disk))}: no space left on the device while writing "
                                            r"(v\.mp4|v\.gif|v\.webp|v_frames|v_sheet\.png|v\.json|v\.lock) \([\d.]+ \S+ free, "
                                            r"[\d.]+ \S+ written when it filled\); the partial files are removed")
    assert list(disk.iterdir()) == []


@pytest.mark.slow
def test_a_real_full_disk_keeps_a_checkpoint_that_resumes(tmp_path, capsys, small_disk):
    """A tmpfs with room for the checkpoint but not for the contact sheet: after it is made larger, the
    command the error gives finishes the video an uninterrupted run writes."""
    disk = small_disk("64k")
    config = tiny_config(tmp_path, "checkpoint = true")
    assert run.main([str(config), "--set", f"output.dir={disk}"]) == 2
    err = capsys.readouterr().err
    one_error_line(err, r"no space left on the device while writing .*; v\.checkpoint keeps the last saved step: once there "
                        r"is room, continue with: ")
    kept = sorted(p.name for p in (disk / "v.checkpoint").iterdir())
    assert kept[-1] == "state.safetensors" and all(name.startswith("shot_") for name in kept[:-1])
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    command = shlex.split(err.split("continue with: ")[1])
    assert run.main(command[3:]) == 0
    assert run.main([str(config), "--set", f"output.dir={tmp_path / 'whole'}"]) == 0
    assert (disk / "v.mp4").read_bytes() == (tmp_path / "whole/v.mp4").read_bytes()


def test_the_tables_cover_enough_cases():
    assert len(RUN) + len(CONFIG_FILES) + len(API) + len(CONVERT) + len(FETCH) + len(READERS) >= 60

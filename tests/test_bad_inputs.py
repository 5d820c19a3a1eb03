"""Bad inputs at every entry point, one table each: the run command and its configuration, the Python
API, the converters, fetch, images, videos, keypoint JSON and LoRA files. Every case must give one
clear message (a regex on its key part), exit code 2 from a command line (a ValueError subclass from
a function), no traceback, and leave no file behind."""

import functools
import http.server
import io
import os
import pickle
import re
import socket
import struct
import threading
import wave
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO
from musev_lite import fetch, lora, pose, run, video_io
from musev_lite.convert import controlnet as convert_controlnet
from musev_lite.convert import musev as convert_musev
from musev_lite.convert import sd15 as convert_sd15
from musev_lite.checkpoint import save_state
from musev_lite.config import load_config
from musev_lite.pipeline import MuseVPipeline, RunState

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
    return d


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
    ("sampler unknown", ["generation.sampler=dpm"], r"generation\.sampler = 'dpm' is not one of euler, ddim"),
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
]


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
               run.fingerprint(load_config(path, ["generation.seed=5", "generation.steps=40"]), 5))
    (out / "broken.checkpoint").mkdir()
    (out / "broken.checkpoint" / "state.safetensors").write_bytes(b"not safetensors")
    return path


@pytest.mark.parametrize("overrides, pattern", [case[1:] for case in RUN], ids=[case[0] for case in RUN])
def test_run_command(config, inputs, capsys, overrides, pattern):
    before = files_in(config.parent)
    argv = [str(config)]
    for item in overrides:
        argv += [item] if item == "--resume" else ["--set", item.format(inputs=inputs)]
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
API = [
    ("image a number", lambda p, d: p("x", 123, **SMALL), r"image array must be uint8 \(H, W, 3\), got int64 \(\)"),
    ("image 2-D", lambda p, d: p("x", np.zeros((16, 16), np.uint8), **SMALL), r"must be uint8 \(H, W, 3\), got uint8 \(16, 16\)"),
    ("image float", lambda p, d: p("x", np.zeros((16, 16, 3)), **SMALL), r"got float64 \(16, 16, 3\)"),
    ("image missing", lambda p, d: p("x", d / "nowhere.png", **SMALL), r"image .*nowhere\.png: no such file"),
    ("refer image unreadable", lambda p, d: p("x", FACE, refer_image=d / "text.png", **SMALL), r"text\.png: not a readable image"),
    ("prompt a number", lambda p, d: p(123, FACE, **SMALL), r"^prompt must be a string, got int 123"),
    ("negative prompt None", lambda p, d: p("x", FACE, negative_prompt=None, **SMALL), r"negative_prompt must be a string, got NoneType"),
    ("config a string", lambda p, d: p("x", FACE, "V2"), r"config must be a GenerationConfig or None, got str 'V2'; give settings as keywords"),
    ("unknown setting", lambda p, d: p("x", FACE, stepz=1), r"unknown generation setting 'stepz'; did you mean 'steps'\?"),
    ("steps 0", lambda p, d: p("x", FACE, steps=0), r"generation\.steps = 0 must be at least 1"),
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
]


@pytest.mark.parametrize("call, pattern", [case[1:] for case in API], ids=[case[0] for case in API])
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
]


@pytest.mark.parametrize("read, name, kwargs, pattern", [case[1:] for case in READERS], ids=[case[0] for case in READERS])
def test_readers(inputs, read, name, kwargs, pattern):
    before = files_in(inputs)
    with pytest.raises(ValueError, match=pattern) as caught:
        read(inputs / name, **kwargs)
    assert "\n" not in str(caught.value)
    assert files_in(inputs) == before


def test_the_tables_cover_enough_cases():
    assert len(RUN) + len(CONFIG_FILES) + len(API) + len(CONVERT) + len(FETCH) + len(READERS) >= 60

"""Every key of the README's Configuration table works: each is set to a value other than its default and
run through the command line (`musev_lite.run.main`) at the tiny preset, at a small size, and the test
sees its effect where it shows (the sidecar, the frames' count, size or pixels against a run without it,
stderr, the files written). A key the README lists without a case here fails the first test, so a new
key cannot be left untried. Keys that need a released model run on a weights folder saved from the demo.

Runs use one thread (see tests/test_distributed.py): on a shared 2-core machine that is the fast way."""

import contextlib
import io
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO
from musev_lite import checkpoint, run
from musev_lite.denoise import context_windows
from musev_lite.device import native_bfloat16
from musev_lite.histmatch import match_frames
from musev_lite.pipeline import MuseVPipeline
from musev_lite.video_io import write_mp4

README = (REPO / "README.md").read_text()


def documented_keys() -> list[str]:
    """The keys of the README's Configuration table, in its order (a row may name two)."""
    table = README.split("## Configuration", 1)[1].split("\n\n| key |", 1)[1].split("\n\n", 1)[0]
    return [key for cell in re.findall(r"^\| ([^|]+) \|", table, re.M) for key in re.findall(r"`(\w+\.\w+)`", cell)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs: images, a 5-frame 12 fps video, a LoRA for the tiny model, a weights folder saved from
    the demo, and the base configuration every case changes one key of."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"face.png": (64, 64), "other.png": (128, 64), "odd.png": (120, 80)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    write_mp4(folder / "clip.mp4", [rng.integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)], fps=12)
    pipe = MuseVPipeline.demo(seed=0)
    pipe.save_pretrained(folder / "weights")
    temporal = MuseVPipeline.demo(seed=0)
    for module in temporal.unet.modules():  # MuseV's init scales the temporal layers' output by 1e-5
        if hasattr(module, "temporal_weight"):
            module.temporal_weight.data.fill_(1.0)
    temporal.save_pretrained(folder / "weights_temporal")
    lora = {}
    for key, layer in [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32),
                       ("lora_unet_down_blocks_0_temp_attentions_0_transformer_blocks_0_attn1_to_q", 32),
                       ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", pipe.text_encoder.config.hidden_size)]:
        lora[f"{key}.lora_down.weight"] = torch.randn(2, layer)
        lora[f"{key}.lora_up.weight"] = torch.randn(layer, 2)
    save_file(lora, folder / "style.safetensors")
    (folder / "base.toml").write_text("""
[model]
preset = "tiny"
[input]
image = "face.png"
prompt = "a face"
negative_prompt = "V1"
[generation]
num_frames = 3
steps = 2
seed = 1
first_frame_steps = 1
[output]
formats = ["png"]
name = "v"
""")
    return folder


class Run:
    """One command-line run: exit code, stderr, and what it wrote in `out`."""

    def __init__(self, out: Path, code: int, err: str):
        self.out, self.code, self.err = out, code, err

    @property
    def sidecar(self) -> dict:
        return json.loads((self.out / "v.json").read_text())

    @property
    def frames(self) -> np.ndarray:
        return np.stack([np.asarray(Image.open(p)) for p in sorted((self.out / "v_frames").iterdir())])

    def error(self) -> str:
        lines = [line for line in self.err.splitlines() if line.startswith("error:")]
        assert self.code == 2 and len(lines) == 1, self.err
        return lines[0]


RUNS: dict = {}


@pytest.fixture
def cli(files, tmp_path_factory):
    """cli(*overrides): run the base configuration with `--set` overrides; runs are kept by their overrides
    (a reference run serves several cases)."""

    def cli(*overrides: str, fresh: bool = False) -> Run:
        if overrides in RUNS and not fresh:
            return RUNS[overrides]
        out = tmp_path_factory.mktemp("out") / "out"
        argv = [str(files / "base.toml"), "--set", f"output.dir={out}"]
        for item in overrides:
            argv += ["--set", item.format(files=files)]
        err, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            code = run.main(argv)
        RUNS[overrides] = Run(out, code, err.getvalue())
        assert "Traceback" not in RUNS[overrides].err
        return RUNS[overrides]

    return cli


def ran(result: Run) -> Run:
    assert result.code == 0, result.err
    return result


def differ(cli, reference: tuple, *overrides: str) -> Run:
    """A run with `overrides` added to `reference`'s, whose frames must differ from `reference`'s."""
    base, changed = ran(cli(*reference)), ran(cli(*reference, *overrides))
    assert base.frames.shape == changed.frames.shape and not np.array_equal(base.frames, changed.frames), overrides
    return changed


def calls_per_step(result: Run) -> set[str]:
    return set(re.findall(r"\((\d+) UNet calls?/step\)", result.err))


V2V = ("input.video={files}/clip.mp4",)
CONTROL = ("input.control=[{{path = '{files}/clip.mp4', controlnet = 'controlnet'}}]",)
T2I2V = ("input.image=", "generation.height=64", "generation.width=64")
WINDOWS = ("generation.num_frames=6", "generation.context_frames=4", "generation.context_overlap=2")


def case_preset(cli, files):
    assert "pipeline demo, not a trained model" in ran(cli()).err and cli().sidecar["demo_weights"]
    real = ran(cli("model.preset=musev_referencenet", "model.weights_dir={files}/weights"))
    assert not real.sidecar["demo_weights"] and np.array_equal(real.frames, cli().frames)  # the demo's weights, saved
    assert "model.preset = 'musev' but model.weights_dir" in cli("model.preset=musev",
                                                                 "model.weights_dir={files}/weights").error()


def case_weights_dir(cli, files):
    real = ran(cli("model.preset=musev_referencenet", "model.weights_dir={files}/weights"))
    assert set(real.sidecar["model_files"]) == {p.name for p in (files / "weights").glob("*.safetensors")}
    missing = cli("model.preset=musev_referencenet", "model.weights_dir={files}/nowhere").error()
    assert f"model.weights_dir '{files}/nowhere' lacks unet.safetensors" in missing


def case_device(cli, files):
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert ran(cli("model.device=auto")).sidecar["device"] == expected
    if not torch.cuda.is_available():
        assert "model.device = 'cuda' but this torch has no CUDA device" in cli("model.device=cuda").error()


def case_dtype(cli, files):
    other = "float32" if native_bfloat16("cpu") else "bfloat16"  # not what "auto" resolves to here
    assert ran(cli()).sidecar["dtype"] != other
    assert differ(cli, (), f"model.dtype={other}").sidecar["dtype"] == other


def case_compile(cli, files, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(module) or module)
    ran(cli("model.compile=true", fresh=True))
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "UNet3D"


def case_lora(cli, files):
    merged = differ(cli, (), "model.lora=[{{path = '{files}/style.safetensors', scale = 0.5}}]")
    assert ("lora: style.safetensors (scale 0.5): merged into 2 UNet layers (1 temporal) and 1 text-encoder layers"
            in merged.err)


def case_task(cli, files):
    drawn = ran(cli("input.task=text2image2video", *T2I2V))
    assert drawn.sidecar["frames"] == 3 and "first frame  step 1/1" in drawn.err  # no condition frame added
    assert "input.task = 'text2image2video' but the inputs make it 'image2video'" in cli(
        "input.task=text2image2video").error()


def case_image(cli, files):
    other = ran(cli("input.image={files}/other.png"))
    assert (other.sidecar["height"], other.sidecar["width"]) == (128, 64)  # the image's size
    assert not np.array_equal(other.frames[0, :64], cli().frames[0])  # frame 0: the image, through the VAE


def case_prompt(cli, files):
    differ(cli, (), "input.prompt=a cat")


def case_negative_prompt(cli, files):
    differ(cli, (), "input.negative_prompt=Empty")


def case_refer_image(cli, files):
    differ(cli, (), "input.refer_image={files}/other.png")


def case_ip_adapter_image(cli, files):
    differ(cli, (), "input.ip_adapter_image={files}/other.png")


def case_video(cli, files):
    video = ran(cli(*V2V))
    assert video.sidecar["frames"] == 5 and "video2video: input.video: 5 of 5 frames" in video.err


def case_control(cli, files):
    control = ran(cli(*CONTROL))
    assert control.sidecar["frames"] == 5 and "input.control[0]: 5 of 5 frames" in control.err


def case_video_sample_rate(cli, files):
    sampled = ran(cli(*V2V, "input.video_sample_rate=2"))
    assert sampled.sidecar["frames"] == 3 and "input.video: 3 of 5 frames (12 fps -> 6 fps)" in sampled.err


def case_video_fps(cli, files):
    resampled = ran(cli(*V2V, "input.video_fps=6"))
    assert resampled.sidecar["frames"] == 3 and "input.video: 3 of 5 frames (12 fps -> 6 fps)" in resampled.err
    both = cli(*V2V, "input.video_fps=6", "input.video_sample_rate=2").error()
    assert "input.video_fps = 6.0 and input.video_sample_rate = 2 are both set" in both


def size_case(*overrides, expected):
    def case(cli, files):
        result = ran(cli(*overrides))
        assert (result.sidecar["height"], result.sidecar["width"]) == expected
        assert f"size: {expected[0]}x{expected[1]} (height x width)" in result.err
    return case


def case_num_frames(cli, files):
    assert ran(cli("generation.num_frames=5")).sidecar["frames"] == 6


def case_n_batch(cli, files):
    shots = ran(cli("generation.n_batch=2"))
    assert shots.sidecar["frames"] == 7 and "shot 2/2  step 2/2" in shots.err


def case_steps(cli, files):
    assert "shot 1/1  step 3/3" in ran(cli("generation.steps=3")).err


def case_guidance_scale_end(cli, files):
    differ(cli, (), "generation.guidance_scale_end=1.0")


def case_guidance_method(cli, files):
    differ(cli, ("generation.steps=3", "generation.guidance_scale_end=1.0"), "generation.guidance_method=two_stage")


def case_first_frame_steps(cli, files):
    assert "first frame  step 2/2" in differ(cli, T2I2V, "generation.first_frame_steps=2").err


def case_redraw_condition_image(cli, files):
    redrawn = ran(cli("generation.redraw_condition_image=true"))
    assert "first frame  step 1/1" in redrawn.err
    assert not np.array_equal(redrawn.frames[0], np.asarray(Image.open(files / "face.png")))


def case_context_frames(cli, files):
    reference, windows = ("generation.num_frames=6", "generation.context_overlap=2"), "generation.context_frames=4"
    assert calls_per_step(cli(*reference)) == {"1"} and calls_per_step(differ(cli, reference, windows)) == {"2"}


def case_context_overlap(cli, files):
    reference = ("generation.num_frames=9", "generation.context_frames=6")
    windows = {overlap: str(len(context_windows("uniform_v2", 9, 6, overlap))) for overlap in (4, 2)}
    assert windows[4] != windows[2] and calls_per_step(cli(*reference)) == {windows[4]}
    assert calls_per_step(differ(cli, reference, "generation.context_overlap=2")) == {windows[2]}


def case_window_batch(cli, files):
    assert calls_per_step(cli(*WINDOWS)) == {"2"}
    assert calls_per_step(ran(cli(*WINDOWS, "generation.window_batch=2"))) == {"1"}


def frames_differ(*reference, key):
    def case(cli, files):
        differ(cli, reference, key)
    return case


def case_sampler(cli, files):
    """Each sampler other than the default: ddim, and lcm at the 4 steps an LCM-LoRA is run with."""
    differ(cli, (), "generation.sampler=ddim")
    differ(cli, ("generation.steps=4",), "generation.sampler=lcm")


def case_seed(cli, files):
    assert differ(cli, (), "generation.seed=2").sidecar["seed"] == 2
    drawn = ran(cli("generation.seed=none", "output.name=", fresh=True))
    [sidecar] = drawn.out.glob("*.json")  # named <config name>-<the seed drawn>
    assert sidecar.name == f"base-{json.loads(sidecar.read_text())['seed']}.json"


def case_video_strength(cli, files):
    def steps_run(result):
        return len(re.findall(r"^shot 1/1  step", result.err, re.M))

    assert steps_run(cli(*V2V)) == 2 and steps_run(differ(cli, V2V, "generation.video_strength=0.5")) == 1  # 1 skipped


def case_motion_speed(cli, files):
    """Frame positions x motion_speed reach the frames through the temporal layers, whose output MuseV's init
    scales by 1e-5; the demo's weights with that scale at 1 show it."""
    differ(cli, ("model.preset=musev_referencenet", "model.weights_dir={files}/weights_temporal"),
           "generation.motion_speed=1")


def case_hist_match(cli, files):
    """Frame 0 stays; every later frame is the plain run's, matched to frame 0 (tests/test_histmatch.py has the
    parity with MuseV's function)."""
    plain, matched = ran(cli()), differ(cli, (), "generation.hist_match=true")
    assert np.array_equal(matched.frames[0], plain.frames[0]) and matched.sidecar["config"]["generation"]["hist_match"]
    assert np.array_equal(matched.frames[1:], match_frames(plain.frames[1:], plain.frames[0]))
    assert "generation.hist_match must be true or false; got 'yes'" in cli("generation.hist_match=yes").error()


def case_dir(cli, files):
    nested = ran(cli("output.dir={files}/made/here", fresh=True))
    assert (files / "made/here/v.json").is_file() and not nested.out.exists()


def case_name(cli, files):
    named = ran(cli("output.name=clip"))
    assert sorted(p.name for p in named.out.iterdir()) == ["clip.json", "clip_frames", "clip_sheet.png"]


def case_formats(cli, files):
    every = ran(cli('output.formats=["mp4", "gif", "webp", "png"]'))
    assert {"v.mp4", "v.gif", "v.webp", "v_frames"} <= {p.name for p in every.out.iterdir()}
    with av.open(str(every.out / "v.mp4")) as container:
        assert len(list(container.decode(video=0))) == 4


def case_fps(cli, files):
    with av.open(str(ran(cli('output.formats=["mp4"]', "output.fps=8")).out / "v.mp4")) as container:
        assert container.streams.video[0].average_rate == 8


def case_contact_sheet(cli, files):
    assert (ran(cli()).out / "v_sheet.png").is_file()
    assert not (ran(cli("output.contact_sheet=false")).out / "v_sheet.png").exists()


def case_overwrite(cli, files):
    first = ran(cli("output.name=again", fresh=True))
    argv = [str(files / "base.toml"), "--set", f"output.dir={first.out}", "--set", "output.name=again"]
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        assert run.main(argv) == 2 and "already exists (and 2 more of this run's outputs)" in err.getvalue()
        assert run.main(argv + ["--set", "output.overwrite=true"]) == 0


TASKS = """
[model]
preset = "tiny"
[input]
image = "face.png"
prompt = "a face, (eye blinks:{blink})"
negative_prompt = "V1"
[generation]
num_frames = 3
steps = 2
seed = 1
[output]
formats = ["png"]

[[task]]
name = "plain"
vars = { blink = 1.0 }

[[task]]
name = "odd"
vars = { blink = 2 }
[task.input]
image = "odd.png"
[task.generation]
num_frames = 5

[[task]]
name = "scaled"
img_length_ratio = 1.0
vars = { blink = 1 }
[task.input]
image = "odd.png"
"""


class TaskRun(Run):
    """A task's part of the task run: its own sidecar and frames."""

    sidecar = frames = None


def task_run(files, tmp_path_factory) -> dict[str, Run]:
    """The [[task]] keys' run: three tasks of one file (each case sees its part), by task name."""
    if "tasks" not in RUNS:
        (files / "tasks.toml").write_text(TASKS)
        out = tmp_path_factory.mktemp("out") / "out"
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            code = run.main([str(files / "tasks.toml"), "--set", f"output.dir={out}"])
        assert code == 0, err.getvalue()
        RUNS["tasks"] = {}
        for name in ("plain", "odd", "scaled"):
            result = RUNS["tasks"][name] = TaskRun(out, code, err.getvalue())
            result.sidecar = json.loads((out / f"{name}-1.json").read_text())
            result.frames = np.stack([np.asarray(Image.open(p)) for p in sorted((out / f"{name}-1_frames").iterdir())])
    return RUNS["tasks"]


def case_task_name(cli, files, tmp_path_factory):
    result = task_run(files, tmp_path_factory)["plain"]
    assert sorted(p.name for p in result.out.iterdir() if p.name.startswith("plain")) == \
        ["plain-1.json", "plain-1_frames", "plain-1_sheet.png"]


def case_task_img_length_ratio(cli, files, tmp_path_factory):
    tasks = task_run(files, tmp_path_factory)  # odd.png is 120x80: x 1.0, floored to 64, as MuseV
    assert tasks["scaled"].frames.shape[1:3] == (64, 64) and tasks["odd"].frames.shape[1:3] == (120, 80)


def case_task_vars(cli, files, tmp_path_factory):
    tasks = task_run(files, tmp_path_factory)
    assert tasks["plain"].sidecar["config"]["input"]["prompt"] == "a face, (eye blinks:1.0)"
    assert tasks["odd"].sidecar["config"]["input"]["prompt"] == "a face, (eye blinks:2)"


def case_task_input(cli, files, tmp_path_factory):
    tasks = task_run(files, tmp_path_factory)
    assert tasks["plain"].frames.shape[1:3] == (64, 64) and tasks["odd"].frames.shape[1:3] == (120, 80)
    assert tasks["odd"].sidecar["config"]["input"]["image"] == str(files / "odd.png")


def case_task_generation(cli, files, tmp_path_factory):
    tasks = task_run(files, tmp_path_factory)
    assert len(tasks["plain"].frames) == 4 and len(tasks["odd"].frames) == 6  # num_frames + the image


def checkpoint_case(*overrides, saved):
    """The (shot, step) of every state the run saved: after sampler steps, and at the next shot's start."""
    def case(cli, files, monkeypatch):
        states = []
        save = checkpoint.Checkpoint.save
        monkeypatch.setattr(checkpoint.Checkpoint, "save",
                            lambda self, state: states.append((state.shot, state.step)) or save(self, state))
        result = ran(cli(*overrides, fresh=True))
        assert states == saved and not (result.out / "v.checkpoint").exists()  # removed once the outputs are published
    return case


CASES = {
    "model.preset": case_preset,
    "model.weights_dir": case_weights_dir,
    "model.device": case_device,
    "model.dtype": case_dtype,
    "model.compile": case_compile,
    "model.lora": case_lora,
    "input.task": case_task,
    "input.image": case_image,
    "input.prompt": case_prompt,
    "input.negative_prompt": case_negative_prompt,
    "input.refer_image": case_refer_image,
    "input.ip_adapter_image": case_ip_adapter_image,
    "input.video": case_video,
    "input.control": case_control,
    "input.video_sample_rate": case_video_sample_rate,
    "input.video_fps": case_video_fps,
    "generation.height": size_case("generation.height=32", expected=(32, 32)),
    "generation.width": size_case("input.image={files}/other.png", "generation.width=32", expected=(64, 32)),
    "generation.size_multiple": size_case("input.image={files}/odd.png", "generation.size_multiple=64", expected=(64, 64)),
    "generation.num_frames": case_num_frames,
    "generation.n_batch": case_n_batch,
    "generation.steps": case_steps,
    "generation.guidance_scale": frames_differ(key="generation.guidance_scale=7"),
    "generation.guidance_scale_end": case_guidance_scale_end,
    "generation.guidance_method": case_guidance_method,
    "generation.first_frame_steps": case_first_frame_steps,
    "generation.first_frame_guidance": frames_differ(*T2I2V, key="generation.first_frame_guidance=2"),
    "generation.redraw_condition_image": case_redraw_condition_image,
    "generation.context_frames": case_context_frames,
    "generation.context_overlap": case_context_overlap,
    "generation.context_schedule": frames_differ("generation.num_frames=5", "generation.context_frames=4",
                                                 "generation.context_overlap=1", key="generation.context_schedule=uniform"),
    "generation.window_batch": case_window_batch,
    "generation.motion_speed": case_motion_speed,
    "generation.w_ind_noise": frames_differ(key="generation.w_ind_noise=0.1"),
    "generation.img_weight": frames_differ(key="generation.img_weight=0.5"),
    "generation.ip_adapter_scale": frames_differ(key="generation.ip_adapter_scale=0"),
    "generation.sampler": case_sampler,
    "generation.seed": case_seed,
    "generation.video_strength": case_video_strength,
    "generation.control_guidance_start": frames_differ(*CONTROL, key="generation.control_guidance_start=0.5"),
    "generation.control_guidance_end": frames_differ(*CONTROL, key="generation.control_guidance_end=0.5"),
    "generation.hist_match": case_hist_match,
    "output.dir": case_dir,
    "output.name": case_name,
    "output.formats": case_formats,
    "output.fps": case_fps,
    "output.contact_sheet": case_contact_sheet,
    "output.overwrite": case_overwrite,
    "output.checkpoint": checkpoint_case("output.checkpoint=true", saved=[(0, 1), (0, 2), (1, 0)]),
    "output.checkpoint_every": checkpoint_case("output.checkpoint=true", "output.checkpoint_every=2",
                                               saved=[(0, 2), (1, 0)]),
    "task.name": case_task_name,
    "task.img_length_ratio": case_task_img_length_ratio,
    "task.vars": case_task_vars,
    "task.input": case_task_input,
    "task.generation": case_task_generation,
}


def test_every_documented_key_has_a_case():
    keys = documented_keys()
    assert len(keys) > 40 and "input.video_fps" in keys
    assert sorted(keys) == sorted(CASES), "a key of the README's Configuration table needs a case here (or is gone)"


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CASES))
def test_key_takes_effect(key, cli, files, request):
    case = CASES[key]
    extra = {name: request.getfixturevalue(name) for name in ("monkeypatch", "tmp_path_factory")
             if name in case.__code__.co_varnames}
    case(cli, files, **extra)

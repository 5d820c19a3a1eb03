"""Video2video end to end at tiny size (the `tiny` preset, whose demo pipeline has a tiny ControlNet):
pose2video from a rendered pose video and from keypoint JSON, RGB-guided video2video through
`python -m musev_lite.run`; `video_strength = 0` returns the input video through the VAE; every window's
ControlNet call sees the control frames of its frames; bad video inputs are one clear error. Parity with
the original is in test_video2video_parity.py."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO, write_lossless
from musev_lite.pipeline import ControlVideo, MuseVPipeline
from musev_lite.plan import fitted_videos
from musev_lite.run import main
from musev_lite.settings import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:prompt truncated")
FAST = dict(steps=2, context_frames=4, context_overlap=2)
RNG = np.random.default_rng(0)
FRAMES = RNG.integers(0, 255, (7, 48, 64, 3)).astype(np.uint8)
IMAGE = RNG.integers(0, 255, (48, 64, 3)).astype(np.uint8)



def keypoints(n):
    body = [v for i in range(18) for v in (10 + 2 * i, 6 + 2 * i, 0.9)]
    return [{"people": [{"pose_keypoints_2d": body}], "canvas_width": 64, "canvas_height": 48}] * n


@pytest.fixture(scope="module")
def pipe():
    return MuseVPipeline.demo(seed=0)


def run_cli(tmp_path, capsys, *overrides):
    args = [str(REPO / "examples/demo.toml")]
    for item in ["generation.steps=2", "generation.context_frames=4", "generation.context_overlap=2",
                 f"output.dir={tmp_path}", "output.name=out", *overrides]:
        args += ["--set", item]
    code = main(args)
    return code, capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pose video", "keypoint JSON", "rgb video", "rgb + pose"])
def test_cli_video2video(tmp_path, capsys, kind):
    pose = write_lossless(tmp_path / "pose.mkv", FRAMES)
    (tmp_path / "pose.json").write_text(json.dumps(keypoints(7)))
    rgb = write_lossless(tmp_path / "rgb.mkv", FRAMES[::-1].copy())
    overrides = {
        "pose video": [f'input.control=[{{path = "{pose}"}}]'],
        "keypoint JSON": [f'input.control=[{{path = "{tmp_path / "pose.json"}"}}]'],
        "rgb video": [f"input.video={rgb}", "input.image="],
        "rgb + pose": [f"input.video={rgb}", f'input.control=[{{path = "{pose}", scale = 0.5}}]'],
    }[kind]
    code, out = run_cli(tmp_path, capsys, *overrides)
    assert code == 0, out.err
    assert "the other 6 frames are generated in one parallel-denoising pass" in out.err
    sidecar = json.loads((tmp_path / "out.json").read_text())
    size = (48, 64) if kind == "rgb video" else (128, 96)  # the video's size, else examples/face.png's
    assert (sidecar["frames"], sidecar["height"], sidecar["width"]) == (7, *size)


@pytest.mark.slow
def test_motion_speed_defaults_to_the_sample_rate_and_an_explicit_value_wins(tmp_path, capsys):
    """MuseV's video2video gives the UNet the video's sample rate as the frame rate, not image2video's 8."""
    rgb = write_lossless(tmp_path / "rgb.mkv", FRAMES)
    runs = {"default": [], "sampled": ["input.video_sample_rate=2"], "explicit": ["generation.motion_speed=3.0"]}
    for name, extra in runs.items():
        code, out = run_cli(tmp_path, capsys, f"input.video={rgb}", "input.image=", f"output.name={name}", *extra)
        assert code == 0, out.err
        runs[name] = (json.loads((tmp_path / f"{name}.json").read_text())["config"]["generation"]["motion_speed"], out.err)
    assert runs["default"][0] == 1.0 and runs["sampled"][0] == 2.0 and runs["explicit"][0] == 3.0
    assert "motion_speed: 1, the rate the video's frames were taken at, as MuseV's video2video" in runs["default"][1]
    assert "motion_speed: 2, the rate" in runs["sampled"][1] and "motion_speed:" not in runs["explicit"][1]


def test_api_video2video_takes_motion_speed_1_unless_told(pipe):
    default = pipe("a face", IMAGE, video=FRAMES, seed=1, **FAST)
    assert torch.equal(default.latents, pipe("a face", IMAGE, video=FRAMES, seed=1, motion_speed=1.0, **FAST).latents)
    assert not torch.equal(default.latents, pipe("a face", IMAGE, video=FRAMES, seed=1, motion_speed=8.0, **FAST).latents)
    image2video = pipe("a face", IMAGE, seed=1, num_frames=4, **FAST)
    assert torch.equal(image2video.latents, pipe("a face", IMAGE, seed=1, num_frames=4, motion_speed=8.0, **FAST).latents)


def test_strength_zero_returns_the_video_through_the_vae(pipe):
    result = pipe("a face", None, video=FRAMES, video_strength=0.0, seed=1, **FAST)
    fitted, _ = fitted_videos(torch.from_numpy(FRAMES), [], 48, 64)
    expected = pipe.encode_frames(fitted[1:])
    assert torch.equal(result.latents[:, :, 1:], expected)
    decoded = pipe.decode(torch.cat([result.latents[:, :, :1], expected], dim=2))  # same decode batches
    assert np.array_equal(result.frames[1:], decoded[1:])


def test_strength_moves_the_start_step(pipe, monkeypatch):
    steps = []
    original = pipe._unet
    monkeypatch.setattr(pipe, "_unet", lambda sample, t, *a, **k: steps.append(float(t)) or original(sample, t, *a, **k))
    pipe("a face", None, video=FRAMES, video_strength=0.5, seed=1, **dict(FAST, steps=4))
    sampler_steps = sorted(set(steps), reverse=True)
    assert len(sampler_steps) == 2  # N (1 - strength) = 2 of 4 steps skipped, as SDEdit / diffusers' img2img


def test_control_frames_reach_the_controlnet_for_every_window(pipe, monkeypatch):
    net = pipe.controlnets["controlnet"]
    seen = []
    original = net.forward
    monkeypatch.setattr(net, "forward", lambda sample, t, text, image, scale: seen.append(image.clone())
                        or original(sample, t, text, image, scale))
    control = np.stack([np.full((48, 64, 3), 10 * i, np.uint8) for i in range(7)])  # frame i is all 10 i
    pipe("a face", IMAGE, control=[ControlVideo(control)], seed=1, window_batch=1, **FAST)
    windows = [[0, 1, 2, 3], [2, 3, 4, 5]]  # 6 generated frames, context 4, overlap 2
    assert len(seen) == len(windows) * FAST["steps"]
    for call, window in zip(seen, windows * FAST["steps"]):
        expected = torch.tensor([0] + [1 + f for f in window]) * 10 / 255
        values = call[:, 0, 0, 0]  # one control image per frame: [uncond window; cond window]
        assert torch.allclose(values, torch.cat([expected, expected]))


def test_control_guidance_end_switches_it_off(pipe, monkeypatch):
    net = pipe.controlnets["controlnet"]
    calls = []
    original = net.forward
    monkeypatch.setattr(net, "forward", lambda *a: calls.append(1) or original(*a))
    pipe("a face", IMAGE, control=[ControlVideo(FRAMES)], seed=1, control_guidance_end=0.5, **FAST)
    assert len(calls) == 2  # first of 2 steps only, both windows


@pytest.mark.parametrize("kwargs, message", [
    (dict(video=FRAMES[:1]), "needs at least 2"),
    (dict(video=FRAMES, control=[ControlVideo(FRAMES[:5])]), r"different lengths \[5, 7\]"),
    (dict(control=[ControlVideo(FRAMES, controlnet="depth")]), "names ControlNet 'depth', but this pipeline has controlnet"),
    (dict(video=FRAMES.astype(np.float32)), "must be uint8 frames"),
])
def test_bad_video_arguments(pipe, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        pipe("a face", IMAGE, seed=1, **FAST, **kwargs)


def test_pose_video_needs_an_image(pipe):
    with pytest.raises(ConfigError, match="needs a condition image"):
        pipe("a face", None, control=[ControlVideo(FRAMES)], seed=1, **FAST)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "input.control\\[0\\]: video .*"),
    (lambda p: p.write_text("not a video"), "input.control\\[0\\]: video .*"),
])
def test_cli_bad_videos(tmp_path, capsys, make, message):
    bad = tmp_path / "bad.mkv"
    make(bad)
    code, out = run_cli(tmp_path, capsys, f'input.control=[{{path = "{bad}"}}]')
    assert code == 2 and out.err.startswith("error: ") and len(out.err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("out*"))


def test_cli_videos_of_different_lengths(tmp_path, capsys):
    pose, rgb = write_lossless(tmp_path / "pose.mkv", FRAMES), write_lossless(tmp_path / "rgb.mkv", FRAMES[:4])
    code, out = run_cli(tmp_path, capsys, f"input.video={rgb}", f'input.control=[{{path = "{pose}"}}]')
    assert code == 2 and "input.video: 4, input.control[0]: 7" in out.err and "loaded" not in out.err
    assert "pipeline demo" not in out.err  # refused before any model is loaded


def test_cli_keypoints_with_bad_fields(tmp_path, capsys):
    (tmp_path / "pose.json").write_text(json.dumps([{"people": [{"pose_keypoints_2d": [1, 2, 0.5]}]}] * 3))
    code, out = run_cli(tmp_path, capsys, f'input.control=[{{path = "{tmp_path / "pose.json"}"}}]')
    assert code == 2 and "input.control[0]" in out.err and "pose_keypoints_2d" in out.err


@pytest.mark.parametrize("at", [(0, 3), (1, 0)], ids=["mid-pass", "after the pass"])
def test_video2video_resumes_to_the_same_video(pipe, at):
    """A video2video pass resumed from a state taken mid-pass continues to the same latents; one taken
    after the pass (shot 1, step 0) has nothing left to do and yields nothing."""
    states = []
    args = dict(video=FRAMES, control=[ControlVideo(FRAMES)], seed=1, video_strength=0.5, steps=4,
                context_frames=4, context_overlap=2)
    whole = list(pipe.generate("a face", None, on_state=states.append, **args))
    assert [(s.shot, s.step) for s in states] == [(0, 3), (0, 4), (1, 0)]  # strength 0.5: steps 3 and 4
    resumed = list(pipe.generate("a face", None, resume=next(s for s in states if (s.shot, s.step) == at), **args))
    assert len(resumed) == (at[0] == 0)
    for a, b in zip(resumed, whole):
        assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)

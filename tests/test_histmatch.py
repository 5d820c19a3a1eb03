"""Histogram matching (`generation.hist_match`, MuseV's need_hist_match): parity with MMCM's
`hist_match_video_bcthw` over scikit-image 0.22's `match_histograms` (tests/fixtures/histmatch, made by
tests/make_fixtures.py from the original), and where the pipeline applies it."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, max_abs_error
from musev_lite.histmatch import match_frame, match_frames
from musev_lite.pipeline import MuseVPipeline
from musev_lite.settings import ConfigError

FIXTURES = REPO / "tests/fixtures/histmatch"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
IMAGE = np.random.default_rng(0).integers(0, 255, (40, 72, 3)).astype(np.uint8)
FAST = dict(steps=2, first_frame_steps=2, context_frames=4, context_overlap=2, height=32, width=48)


def as_bytes(video: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) floats in [0, 1] -> (T, H, W, 3) uint8 by x * 255 truncated in float32, as
    `MuseVPipeline.decode` makes its frames and MuseV its bytes."""
    return (video[0].permute(1, 2, 3, 0) * 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("case", CASES)
def test_matches_the_original(case):
    """Exact: the same integer counts and float64 shares go through the same linear interpolation and
    truncation, so the levels agree bit for bit; the tolerance is 0 levels. The original returns levels / 255
    in float64, which MuseV stores as float32 and writes as x * 255 truncated: that gives back every level."""
    fixture = load_file(FIXTURES / "cases.safetensors")
    frames, reference = fixture[f"{case}.frames"], fixture[f"{case}.reference"]
    theirs = (frames.numpy() * 255).astype(np.uint8)  # the bytes hist_match_video_bcthw makes, in numpy
    assert np.array_equal(as_bytes(frames), theirs[0].transpose(1, 2, 3, 0))
    levels = fixture[f"{case}.levels"]  # the original's output x 255
    written = as_bytes((levels.double() / 255).float())
    assert np.array_equal(written, levels[0].permute(1, 2, 3, 0).numpy())
    ours = match_frames(as_bytes(frames), as_bytes(reference)[0])
    assert max_abs_error(torch.from_numpy(ours), torch.from_numpy(written), f"hist match {case} (levels)") == 0
    assert not np.array_equal(ours, as_bytes(frames))  # the case does change the frames


def test_a_frame_matched_to_itself_is_unchanged():
    frame = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    frame[..., 2] //= 40  # few levels, with gaps
    assert np.array_equal(match_frame(frame, frame), frame)


@pytest.mark.parametrize("frames, reference, message", [
    (np.zeros((2, 4, 4, 3), np.float32), np.zeros((4, 4, 3), np.uint8), "needs uint8 frames (F, H, W, C); got float32"),
    (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), "got uint8 (4, 4, 3)"),
    (np.zeros((2, 4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8), "reference image (H, W, 3)"),
    (np.zeros((2, 4, 4, 3), np.uint8), np.zeros((0, 4, 3), np.uint8), "got uint8 (0, 4, 3)"),
])
def test_bad_inputs(frames, reference, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        match_frames(frames, reference)


@pytest.fixture(scope="module")
def pipe():
    return MuseVPipeline.demo(seed=0)


@pytest.mark.parametrize("image", [IMAGE, None], ids=["image2video", "text2image2video"])
def test_pipeline_matches_every_generated_frame_to_frame_0(pipe, image):
    """Shot by shot equals MuseV's whole video at once (each frame is matched on its own to frame 0); frame 0
    and the latents stay as they were."""
    args = dict(num_frames=3, n_batch=2, seed=5, **FAST)
    plain = pipe("a face", image, **args)
    matched = pipe("a face", image, hist_match=True, **args)
    assert torch.equal(plain.latents, matched.latents) and np.array_equal(plain.frames[0], matched.frames[0])
    assert np.array_equal(matched.frames[1:], match_frames(plain.frames[1:], plain.frames[0]))
    assert not np.array_equal(matched.frames, plain.frames)


def test_resumed_after_shot_0_matches_to_the_same_frame_0(pipe):
    states = []
    args = dict(num_frames=3, n_batch=2, seed=5, hist_match=True, **FAST)
    whole = list(pipe.generate("a face", IMAGE, on_state=states.append, **args))
    resumed = list(pipe.generate("a face", IMAGE, resume=next(s for s in states if s.shot == 1), **args))
    assert [s.index for s in resumed] == [1] and np.array_equal(resumed[0].frames, whole[1].frames)


def test_video2video_matches_too(pipe):
    video = np.random.default_rng(2).integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    plain = pipe("a face", video=video, seed=5, **FAST)
    matched = pipe("a face", video=video, seed=5, hist_match=True, **FAST)
    assert np.array_equal(matched.frames[1:], match_frames(plain.frames[1:], plain.frames[0]))


def test_bad_setting(pipe):
    with pytest.raises(ConfigError, match="generation.hist_match must be true or false; got 'yes'"):
        pipe("a face", IMAGE, hist_match="yes", **FAST)

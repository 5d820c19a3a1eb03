"""Reading source videos: frame choice (fps, sample_rate), MuseV's centre crop-resize, and bad input."""

import json

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_abs_error, write_lossless
from musev_lite.video_io import MediaError, crop_resize, read_video, write_mp4

COLOURS = np.array([[(37 * t) % 256, (90 + 53 * t) % 256, (200 - 29 * t) % 256] for t in range(12)], dtype=np.uint8)



def solid(n, h=6, w=8):
    """Frame t is filled with COLOURS[t], so a frame read back tells which source frame it was."""
    return np.broadcast_to(COLOURS[:n, None, None], (n, h, w, 3)).copy()


def frame_ids(frames):
    return [int(np.flatnonzero((COLOURS == f[0, 0]).all(1))[0]) for f in frames]


def test_reads_every_frame_exactly(tmp_path):
    video = np.random.default_rng(0).integers(0, 256, (5, 6, 8, 3), dtype=np.uint8)
    out = read_video(write_lossless(tmp_path / "v.mkv", video, 24))
    assert np.array_equal(out.frames, video)
    assert (out.fps, out.source_fps, out.source_frames, out.indices) == (24, 24, 5, (0, 1, 2, 3, 4))


def test_fps_keeps_the_nearest_frames(tmp_path):
    path = write_lossless(tmp_path / "v.mkv", solid(12), 24)
    half = read_video(path, fps=12)
    assert half.indices == (0, 2, 4, 6, 8, 10) and frame_ids(half.frames) == list(half.indices)
    assert (half.fps, half.source_fps, half.source_frames) == (12, 24, 12)
    # 24 -> 10 fps: output frame k at time k/10 s is source frame k*2.4 rounded (half up)
    assert read_video(path, fps=10).indices == (0, 2, 5, 7, 10)
    # 24 -> 36 fps: frames repeat (k*2/3 rounded: 0, 1, 1, 2, 3, 3, ...), none is skipped
    up = read_video(path, fps=36)
    assert up.indices[:6] == (0, 1, 1, 2, 3, 3) and sorted(set(up.indices)) == list(range(12))
    assert frame_ids(up.frames) == list(up.indices)


def test_sample_rate_takes_every_nth_frame(tmp_path):
    out = read_video(write_lossless(tmp_path / "v.mkv", solid(10), 24), sample_rate=3)
    assert out.indices == (0, 3, 6, 9) and frame_ids(out.frames) == [0, 3, 6, 9]
    assert (out.fps, out.source_frames) == (8, 10)


def test_crop_resize_matches_musev():
    """Against MMCM batch_dynamic_crop_resize_images run on the same uint8 clips (tests/make_fixtures.py
    video_crop). Exact with the same torch build. Tolerance: one uint8 level on at most 1% of the values
    (torch's uint8 bilinear kernel is CPU- and release-specific code); resizing in float and rounding
    differs on ~20% of them, a crop one pixel off by tens of levels."""
    tensors = load_file(FIXTURES / "video_crop/cases.safetensors")
    cases = json.loads((FIXTURES / "video_crop/cases.json").read_text())["cases"]
    for case in cases:
        clip, expected = tensors[f"{case['key']}.input"].numpy(), tensors[f"{case['key']}.output"]
        ours = torch.from_numpy(np.stack([crop_resize(frame, *case["target"]) for frame in clip]))
        err = max_abs_error(ours.int(), expected.int(), f"crop {case['source']} -> {case['target']}")
        differing = (ours != expected).float().mean().item()
        print(f"  values differing: {differing:.2%}")
        assert err <= 1 and differing <= 0.01


def test_read_video_crop_resizes_each_frame(tmp_path):
    video = np.random.default_rng(1).integers(0, 256, (3, 30, 50, 3), dtype=np.uint8)
    out = read_video(write_lossless(tmp_path / "v.mkv", video, 8), 16, 24)
    assert out.frames.shape == (3, 16, 24, 3) and out.frames.dtype == np.uint8
    assert all(np.array_equal(out.frames[t], crop_resize(video[t], 16, 24)) for t in range(3))
    # the centre is kept: a 50 wide, 30 high frame cropped to 1:1 loses 10 columns on each side
    marked = np.zeros((1, 30, 50, 3), dtype=np.uint8)
    marked[:, :, :10] = 255
    marked[:, :, 40:] = 255
    square = read_video(write_lossless(tmp_path / "m.mkv", marked, 8), 29, 29).frames[0]
    assert square.max() == 0


def test_bad_arguments(tmp_path):
    path = write_lossless(tmp_path / "v.mkv", solid(3), 24)
    for kwargs, message in [
        ({"fps": 0}, "fps must be a positive number, got 0"), ({"fps": float("nan")}, "fps must be"),
        ({"fps": "12"}, "fps must be"), ({"fps": True}, "fps must be"),
        ({"sample_rate": 0}, "sample_rate must be an integer >= 1, got 0"),
        ({"sample_rate": 1.5}, "sample_rate must be"),
        ({"fps": 12, "sample_rate": 2}, "give fps or sample_rate, not both"),
        ({"height": 16}, "give both height and width"), ({"height": 0, "width": 8}, "positive integers"),
    ]:
        with pytest.raises(MediaError, match=message):
            read_video(path, **kwargs)
    with pytest.raises(MediaError, match="too small to crop"):
        crop_resize(np.zeros((1, 5, 3), dtype=np.uint8), 4, 4)
    thin = write_lossless(tmp_path / "thin.mkv", np.zeros((2, 1, 8, 3), dtype=np.uint8), 24)
    with pytest.raises(MediaError, match="thin.mkv: 8x1 frames are too small to crop to 4x4"):
        read_video(thin, 4, 4)


def test_bad_files(tmp_path):
    with pytest.raises(MediaError, match="missing.mp4: no such file"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all " * 20)
    with pytest.raises(MediaError, match="junk.mp4: not a readable video"):
        read_video(tmp_path / "junk.mp4")

    def audio(container):
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)

    with av.open(str(tmp_path / "sound.wav"), "w") as container:
        audio(container)
    with pytest.raises(MediaError, match="sound.wav: the file has no video stream"):
        read_video(tmp_path / "sound.wav")
    with av.open(str(tmp_path / "silent.mkv"), "w") as container:  # a video stream that holds no frame
        video = container.add_stream("ffv1", rate=24)
        video.width, video.height, video.pix_fmt = 8, 6, "bgr0"
        audio(container)
    with pytest.raises(MediaError, match="silent.mkv: no frame could be decoded"):
        read_video(tmp_path / "silent.mkv")
    # an mp4 whose picture data is overwritten: the container opens, no frame decodes
    write_mp4(tmp_path / "broken.mp4", [solid(3, 16, 16)], fps=8)
    data = bytearray((tmp_path / "broken.mp4").read_bytes())
    start = data.find(b"mdat") + 4
    end = start + int.from_bytes(data[start - 8:start - 4], "big") - 8
    data[start:end] = bytes(end - start)
    (tmp_path / "broken.mp4").write_bytes(bytes(data))
    with pytest.raises(MediaError, match="broken.mp4: no frame could be decoded"):
        read_video(tmp_path / "broken.mp4")

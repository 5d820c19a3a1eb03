"""Reading and fitting images; writing videos, frames and sidecars atomically."""

import av
import numpy as np
import pytest
from PIL import Image

from musev_lite.video_io import (
    MediaError,
    as_pil,
    contact_sheet,
    fit_image,
    read_image,
    write_animation,
    write_json,
    write_mp4,
    write_png_frames,
)


def frames(n=5, h=34, w=50):
    """Smooth colour gradients that shift from frame to frame (codec-friendly, all different)."""
    y, x = np.mgrid[0:h, 0:w]
    video = np.empty((n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        video[t, ..., 0] = (x * 200 // w + 10 * t) % 256
        video[t, ..., 1] = y * 200 // h
        video[t, ..., 2] = (100 + 20 * t) % 256
    return video


def test_mp4_round_trip(tmp_path):
    video = frames(7)
    path = tmp_path / "v.mp4"
    assert write_mp4(path, [video[:3], video[3:]], fps=12) == 7
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == 12
        assert stream.codec_context.name == "h264"
    assert len(decoded) == 7 and decoded[0].shape == (34, 50, 3)
    assert np.abs(decoded[4].astype(int) - video[4]).mean() < 4  # lossy, but the same picture
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_mp4_odd_size_is_padded(tmp_path):
    write_mp4(tmp_path / "odd.mp4", [frames(2, 33, 47)], fps=8)
    with av.open(str(tmp_path / "odd.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (48, 34)


def test_interrupted_write_leaves_nothing(tmp_path):
    def broken():
        yield frames(2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_mp4(tmp_path / "v.mp4", broken(), fps=12)
    with pytest.raises(KeyboardInterrupt):
        write_png_frames(tmp_path / "frames", broken())
    assert list(tmp_path.iterdir()) == []


def test_png_frames_gif_webp(tmp_path):
    video = frames(4)
    assert write_png_frames(tmp_path / "frames", [video]) == 4
    assert np.array_equal(np.asarray(Image.open(tmp_path / "frames" / "00003.png")), video[3])
    pil = [Image.fromarray(f) for f in video]
    for suffix in ("gif", "webp"):
        write_animation(tmp_path / f"v.{suffix}", pil, fps=10)
        with Image.open(tmp_path / f"v.{suffix}") as image:
            assert image.n_frames == 4 and image.size == (50, 34)
            if suffix == "gif":
                assert image.info["duration"] == 100


def test_contact_sheet_samples_first_and_last():
    video = frames(20, 8, 10)
    sheet = np.asarray(contact_sheet(video, columns=4, max_frames=8))
    assert sheet.shape == (2 * 8, 4 * 10, 3)
    assert np.array_equal(sheet[:8, :10], video[0])
    assert np.array_equal(sheet[8:, 30:], video[19])


def test_read_image_composites_alpha_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2, :, :] = (255, 0, 0, 255)  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = np.asarray(read_image(tmp_path / "a.png"))
    assert image[0, 0].tolist() == [255, 0, 0] and image[3, 3].tolist() == [255, 255, 255]


def test_bad_images_are_named(tmp_path):
    with pytest.raises(MediaError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(MediaError, match="junk.png: not a readable image"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(MediaError, match=r"uint8 \(H, W, 3\)"):
        as_pil(np.zeros((4, 4), dtype=np.float32))


def test_fit_image_crops_the_centre():
    # 40x20 landscape with a 10-px red band on each side -> 16x16 keeps only the middle (white)
    array = np.full((20, 40, 3), 255, dtype=np.uint8)
    array[:, :10] = (255, 0, 0)
    array[:, 30:] = (255, 0, 0)
    out = np.asarray(fit_image(Image.fromarray(array), 16, 16))
    assert out.shape == (16, 16, 3)
    assert out[:, 2:-2].min() > 240  # the centre square is white
    portrait = fit_image(Image.fromarray(array.transpose(1, 0, 2).copy()), 8, 16)
    assert portrait.size == (16, 8)


def test_json_sidecar(tmp_path):
    write_json(tmp_path / "out.json", {"seed": 3, "path": tmp_path})
    assert '"seed": 3' in (tmp_path / "out.json").read_text()

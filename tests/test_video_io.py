"""Reading and fitting images; writing videos, frames and sidecars atomically."""

import math
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from musev_lite.video_io import (
    MediaError,
    as_pil,
    check_fps,
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


def test_same_frames_same_bytes(tmp_path):
    """The README's "same seed, same video": every format, written twice, byte for byte. (Before
    x264 ran on one thread without macroblock-tree, this size gave 34 different mp4s in 60 writes.)"""
    video = frames(8, 128, 160)
    pil = [Image.fromarray(f) for f in video]
    for run in ("a", "b"):
        write_mp4(tmp_path / f"{run}.mp4", [video], fps=12)
        write_png_frames(tmp_path / f"{run}_frames", [video])
        for suffix in ("gif", "webp"):
            write_animation(tmp_path / f"{run}.{suffix}", pil, fps=12)
    for name in ("{}.mp4", "{}.gif", "{}.webp", "{}_frames/00000.png", "{}_frames/00007.png"):
        assert (tmp_path / name.format("a")).read_bytes() == (tmp_path / name.format("b")).read_bytes(), name


@pytest.mark.parametrize("fps", [0, 0.5, 1e-9, 240.01, 1e9, math.inf, -math.inf, math.nan, -12, "12", None, True])
def test_bad_fps_is_refused_before_writing(tmp_path, fps):
    with pytest.raises(MediaError, match=r"fps = .* must be a number from 1 to 240"):
        check_fps(fps)
    with pytest.raises(MediaError, match=r"fps = .* must be a number from 1 to 240"):
        write_mp4(tmp_path / "v.mp4", [frames(2)], fps)
    with pytest.raises(MediaError, match=r"fps = .* must be a number from 1 to 240"):
        write_animation(tmp_path / "v.gif", [Image.fromarray(f) for f in frames(2)], fps)
    assert list(tmp_path.iterdir()) == []


def test_animations_stop_at_50_fps(tmp_path):
    assert check_fps(240, ["mp4", "png"]) == 240.0
    with pytest.raises(MediaError, match=r"fps = 60 is too fast for gif and webp .* use fps <= 50"):
        check_fps(60, ["mp4", "webp", "gif"])
    with pytest.raises(MediaError, match="too fast for gif"):
        write_animation(tmp_path / "v.gif", [Image.fromarray(f) for f in frames(2)], 51)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps", [1, 30000 / 1001, 240])
def test_extreme_fps_mp4_decodes(tmp_path, fps):
    write_mp4(tmp_path / "v.mp4", [frames(3, 16, 16)], fps)
    with av.open(str(tmp_path / "v.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(fps).limit_denominator(1001)
        times = [frame.time for frame in container.decode(stream)]
    assert times == pytest.approx([0, 1 / fps, 2 / fps], abs=1e-6)


@pytest.mark.parametrize("suffix", ["gif", "webp"])
@pytest.mark.parametrize("fps", [1, 50])
def test_extreme_fps_animation_decodes(tmp_path, suffix, fps):
    write_animation(tmp_path / f"v.{suffix}", [Image.fromarray(f) for f in frames(3, 16, 16)], fps)
    durations = []
    with Image.open(tmp_path / f"v.{suffix}") as image:
        for index in range(image.n_frames):
            image.seek(index)
            image.load()  # WebP sets the duration on load
            durations.append(image.info["duration"])
    assert durations == [1000 / fps] * 3


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


def over_white(value, alpha):
    return round(value * alpha / 255 + 255 * (1 - alpha / 255))


def image_from(mode, size, data, **info):
    image = Image.frombytes(mode, size, bytes(data))
    image.info.update(info)
    return image


def u16(values, order="<"):
    return np.array(values, dtype=f"{order}u2").tobytes()


GRAY16 = [0, 25700, 32768, 65535]  # -> 0, 100, 128 (32768 is not white), 255
GRAY16_RGB = [[round(v * 255 / 65535)] * 3 for v in GRAY16]
MODES = {  # mode: (image of known values, its RGB pixels left to right)
    "1": (Image.frombytes("1", (2, 1), bytes([0b01000000])), [[0] * 3, [255] * 3]),
    "L": (image_from("L", (3, 1), [0, 100, 255]), [[0] * 3, [100] * 3, [255] * 3]),
    "I;16": (image_from("I;16", (4, 1), u16(GRAY16)), GRAY16_RGB),
    "I;16L": (image_from("I;16L", (4, 1), u16(GRAY16)), GRAY16_RGB),
    "I;16B": (image_from("I;16B", (4, 1), u16(GRAY16, ">")), GRAY16_RGB),
    "I": (Image.fromarray(np.array([GRAY16], dtype=np.int32)), GRAY16_RGB),
    "F": (Image.fromarray(np.array([[0, 0.5, 1]], dtype=np.float32)), [[0] * 3, [128] * 3, [255] * 3]),
    "LA": (image_from("LA", (3, 1), [100, 255, 100, 0, 100, 128]), [[100] * 3, [255] * 3, [over_white(100, 128)] * 3]),
    "La": (image_from("La", (2, 1), [50, 128, 0, 0]), [[over_white(100, 128)] * 3, [255] * 3]),  # 50 = 100 x 128/255
    "RGBA": (image_from("RGBA", (3, 1), [255, 0, 0, 255, 255, 0, 0, 0, 0, 0, 255, 128]),
             [[255, 0, 0], [255, 255, 255], [over_white(0, 128), over_white(0, 128), 255]]),
    "RGBa": (image_from("RGBa", (1, 1), [0, 0, 128, 128]), [[over_white(0, 128), over_white(0, 128), 255]]),
    "CMYK": (image_from("CMYK", (4, 1), [0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 255, 0, 0]),
             [[255, 255, 255], [0, 0, 0], [0, 255, 255], [255, 0, 255]]),
    "L+transparency": (image_from("L", (2, 1), [0, 200], transparency=200), [[0] * 3, [255] * 3]),
}


def palette_image(mode):
    image = Image.new(mode, (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])  # 0 red, 1 blue
    if mode == "PA":
        image.putpixel((0, 0), (0, 255))
        image.putpixel((1, 0), (1, 0))
    else:
        image.putpixel((1, 0), 1)
        image.info["transparency"] = 1
    return image


MODES["PA"] = (palette_image("PA"), [[255, 0, 0], [255, 255, 255]])
MODES["P+transparency"] = (palette_image("P"), [[255, 0, 0], [255, 255, 255]])


@pytest.mark.parametrize("mode", MODES)
def test_image_modes_become_rgb(mode):
    """16-bit is scaled (not clipped to white), transparency goes on white (as the original)."""
    image, expected = MODES[mode]
    assert image.mode == mode.split("+")[0]
    rgb = np.asarray(as_pil(image)).astype(int)
    assert rgb.shape == (1, len(expected), 3)
    assert np.abs(rgb[0] - np.array(expected)).max() <= 1, (rgb[0].tolist(), expected)  # composite rounding


@pytest.mark.parametrize("mode,suffix", [("I;16", "png"), ("I;16B", "tif"), ("F", "tif")])
def test_high_bit_depth_files(tmp_path, mode, suffix):
    image, expected = MODES[mode]
    image.save(tmp_path / f"x.{suffix}")
    with Image.open(tmp_path / f"x.{suffix}") as reopened:
        assert reopened.mode == mode
    assert np.asarray(read_image(tmp_path / f"x.{suffix}")).tolist() == [expected]


@pytest.mark.parametrize("array,found", [
    (np.array([[0, 70000]], dtype=np.int32), "70000"),
    (np.array([[-1, 0]], dtype=np.int32), "-1"),
    (np.array([[0.5, 2.0]], dtype=np.float32), "2"),
    (np.array([[np.nan, 0]], dtype=np.float32), "nan"),
])
def test_out_of_range_values_are_refused(tmp_path, array, found):
    Image.fromarray(array).save(tmp_path / "x.tif")
    with pytest.raises(MediaError, match=rf"x.tif: mode [IF] values must lie in 0..(65535|1), found {found}; save it as"):
        read_image(tmp_path / "x.tif")


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

"""Images in, videos out: reading and fitting input images, and writing every output atomically.

Every writer puts its bytes under a temporary name in the target folder and renames at the end, so
an interrupted run leaves no half-written file, and a full disk is one DiskFullError saying how much was
free and written (`limits.room_for`). Videos are consumed as an iterable of uint8 chunks
(n, H, W, 3) so a long video never has to sit in memory as a whole for mp4 or PNG output.
(`outputs.py` makes one run's files appear together or not at all.)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from itertools import count
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .limits import room_for
from .settings import FORMATS
from .weights import atomic_path


class MediaError(ValueError):
    """An input image cannot be used or an output cannot be written."""


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB (`to_rgb`)."""
    path = Path(path)
    if path.is_dir():
        raise MediaError(f"image {path}: is a folder, not an image file")
    if not path.is_file():
        raise MediaError(f"image {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, f"image {path}")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise MediaError(f"image {path}: not a readable image ({err})") from None


def to_rgb(image: Image.Image, source: str = "image") -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit (I;16, I;16B, I;16L, and I, which holds 16-bit data as
    Pillow decodes it) is scaled by 255/65535 and float (F) by 255 from 0..1, rounded; other ranges of
    I and F are refused, not clipped. Transparent parts (RGBA, LA, PA, premultiplied RGBa and La, or a
    transparent colour of a P, L or RGB image) are composited on white, as the original reads images.
    Other modes (1, L, P, CMYK, YCbCr, ...) are converted by Pillow. `source` names the image in errors."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        top = 1.0 if mode == "F" else 65535.0
        bad = ~np.isfinite(values) | (values < 0) | (values > top)
        if bad.any():
            raise MediaError(f"{source}: mode {mode} values must lie in 0..{top:g}, found {values[bad][0]:g}; "
                             "save it as an 8- or 16-bit image")
        return Image.fromarray(np.round(values * (255 / top)).astype(np.uint8)).convert("RGB")
    if mode in ("La", "RGBa"):  # premultiplied alpha: over white, c*a/255 + 255*(1 - a/255) = stored c + 255 - a
        values = np.asarray(image).astype(np.int16)
        over_white = (values[..., :-1] + 255 - values[..., -1:]).clip(0, 255).astype(np.uint8)
        return Image.fromarray(over_white.squeeze(-1) if mode == "La" else over_white).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise MediaError(f"{source}: mode {mode} cannot be converted to RGB ({err}); save it as RGB") from None


def as_pil(image) -> Image.Image:
    """A PIL image, a path, or a uint8 array (H,W,3) -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise MediaError(f"image array must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre-crop to the target aspect ratio (`crop_box`), then resize to (width, height) with Lanczos.

    MuseV's image preprocessing (MMCM dynamic_crop_resize_image) crops with the same arithmetic as its
    video crop: the last row and column are always dropped. Reproduced so the same image gives the same
    condition latent.
    """
    y1, y2, x1, x2 = crop_box(image.height, image.width, height, width)
    return image.crop((x1, y1, x2, y2)).resize((width, height), resample=Image.Resampling.LANCZOS)


# Frames per second every writer accepts. Above 240 (the fastest cameras and displays) H.264 outgrows
# level 5.2 at 1080p (2,073,600 macroblocks/s / 8160 = 254 fps), and at extreme rates the container's
# microsecond duration rounds to 0 (1e9 fps: no duration). Below 1 fps a video is a slide show (more
# likely a typo). Browsers play an animation frame of 10 ms or less at 100 ms, and GIF delays come in
# steps of 10 ms, so GIF and WebP stop at 50 fps (20 ms).
FPS_RANGE = (1.0, 240.0)
ANIMATION_MAX_FPS = 50.0


def check_fps(fps: float, formats: Iterable[str] = FORMATS) -> float:
    """`fps` as a float if every format in `formats` can play it (FPS_RANGE, ANIMATION_MAX_FPS for
    gif/webp), else MediaError. Call it before generating, not only when writing."""
    low, high = FPS_RANGE
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not low <= fps <= high:
        raise MediaError(f"fps = {fps!r} must be a number from {low:g} to {high:g}")
    animated = sorted({f for f in formats if f in ("gif", "webp")})
    if animated and fps > ANIMATION_MAX_FPS:
        raise MediaError(f"fps = {fps!r} is too fast for {' and '.join(animated)} (browsers play frames shorter "
                         f"than 20 ms at 100 ms): use fps <= {ANIMATION_MAX_FPS:g} or write mp4")
    return float(fps)


class Mp4Writer:
    """H.264 / yuv420p mp4 written chunk by chunk: the encoder stays open between `write` calls, so a
    long video is encoded as its shots finish and never sits in memory as a whole. Leaving the `with`
    block normally finishes the file (`close`); leaving it by an exception closes it unfinished
    (`abort`). Odd sizes are padded by one edge pixel. The same frames give the same bytes (with the
    same x264)."""

    def __init__(self, path: Path, fps: float):
        import av  # imported here: only video output needs the codec library

        self.path, self.frames, self.stream = Path(path), 0, None
        self.rate = Fraction(check_fps(fps, ("mp4",))).limit_denominator(1001)  # 30000/1001 stays exact
        # through a file object of ours: when finishing fails (a full disk), av leaves its own file open
        self.file = open(path, "wb")
        try:
            self.container = av.open(self.file, mode="w", format="mp4")
        except BaseException:
            self.file.close()
            raise
        self.to_frame = av.VideoFrame.from_ndarray
        self.codec_errors = (OSError, av.error.FFmpegError)

    def write(self, chunk: np.ndarray) -> None:
        """Encode uint8 frames (n, H, W, 3)."""
        for frame in chunk:
            if self.stream is None:
                h, w = frame.shape[:2]
                self.stream = self.container.add_stream("libx264", rate=self.rate)
                self.stream.width, self.stream.height = w + w % 2, h + h % 2
                self.stream.pix_fmt = "yuv420p"
                # Same frames, same bytes: x264's thread count (by default from the CPU count) changes
                # its output, and its AVX-512 macroblock-tree code varies from run to run.
                self.stream.options = {"crf": "17", "x264-params": "mbtree=0"}
                self.stream.codec_context.thread_count = 1
            if frame.shape[0] % 2 or frame.shape[1] % 2:
                frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
            self.container.mux(self.stream.encode(self.to_frame(np.ascontiguousarray(frame), format="rgb24")))
            self.frames += 1

    def close(self) -> int:
        """Flush the frames the encoder holds back and finish the file (only then does it play); the
        number of frames."""
        container, self.container = self.container, None
        try:
            if self.stream is None:
                raise MediaError(f"{self.path}: no frames to write")
            container.mux(self.stream.encode())
        finally:
            try:
                container.close()
            finally:
                self.file.close()
        return self.frames

    def abort(self) -> None:
        """Close the file unfinished (after an error or an interrupt). The file is thrown away, so an error
        closing it (the full disk that stopped the write, again) is not raised over the first one."""
        container, self.container = self.container, None
        try:
            container.close()
        except self.codec_errors:
            pass
        finally:
            try:
                self.file.close()
            except OSError:
                pass

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mp4(path: Path, chunks: Iterable[np.ndarray], fps: float) -> int:
    """An mp4 of uint8 chunks (n, H, W, 3) at `path`, atomically (`Mp4Writer`); the number of frames."""
    with atomic_path(path) as tmp, room_for(path.parent, path.name, written=tmp), Mp4Writer(tmp, fps) as writer:
        for chunk in chunks:
            writer.write(chunk)
    return writer.frames


def write_animation(path: Path, frames: list[Image.Image], fps: float) -> None:
    """Looping GIF or WebP (by suffix) through pillow."""
    fmt = "GIF" if path.suffix.lower() == ".gif" else "WEBP"
    duration_ms = round(1000 / check_fps(fps, (fmt.lower(),)))
    extra = {"lossless": False, "quality": 90} if fmt == "WEBP" else {"disposal": 2}
    with atomic_path(path) as tmp, room_for(path.parent, path.name, written=tmp):
        frames[0].save(tmp, format=fmt, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0, **extra)


def write_png_frames(directory: Path, chunks: Iterable[np.ndarray]) -> int:
    """A folder of 00000.png, 00001.png, ...; appears only when complete."""
    count = 0
    with atomic_path(directory, is_dir=True) as tmp, room_for(directory.parent, directory.name, written=tmp):
        for chunk in chunks:
            for frame in chunk:
                Image.fromarray(frame).save(tmp / f"{count:05d}.png")
                count += 1
    return count


def sheet_picks(total: int, max_frames: int = 16) -> list[int]:
    """The indices of up to `max_frames` evenly spaced frames of `total` (first and last included)."""
    return np.unique(np.linspace(0, total - 1, min(max_frames, total)).round().astype(int)).tolist()


def contact_sheet(frames: np.ndarray, columns: int = 4, max_frames: int = 16) -> Image.Image:
    """A grid of up to `max_frames` evenly spaced frames (`sheet_picks`)."""
    picks = sheet_picks(len(frames), max_frames)
    h, w = frames.shape[1:3]
    rows = math.ceil(len(picks) / columns)
    cols = min(columns, len(picks))
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for n, index in enumerate(picks):
        sheet.paste(Image.fromarray(frames[index]), ((n % cols) * w, (n // cols) * h))
    return sheet


def write_image(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp, room_for(path.parent, path.name, written=tmp):
        image.save(tmp, format="PNG")


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp, room_for(path.parent, path.name, written=tmp):
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def crop_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of the centre region of an h x w picture with the aspect ratio of height x width.

    The arithmetic of MuseV's video and image crops (MMCM batch_dynamic_crop_resize_images,
    dynamic_crop_resize_image): starts rounded up, far edges rounded up then clipped to size-1, and the
    slice [y1:y2, x1:x2] excludes the far edge, so the last row and column are always dropped, even when
    no crop is needed.
    """
    if w / h >= width / height:
        excess = (w - h * width / height) / 2
        y1, y2, x1, x2 = 0, h - 1, math.ceil(excess), math.ceil(w - excess)
    else:
        excess = (h - w * height / width) / 2
        y1, y2, x1, x2 = math.ceil(excess), math.ceil(h - excess), 0, w - 1
    return max(0, y1), min(y2, h - 1), max(0, x1), min(x2, w - 1)


def crop_resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (height, width, 3): centre crop (crop_box), then torch's bilinear resize.

    MuseV resizes the decoded uint8 frames themselves (no float conversion, align_corners=False, no
    antialiasing), so torch's uint8 kernel does the rounding; done the same way here.
    """
    import torch

    y1, y2, x1, x2 = crop_box(frame.shape[0], frame.shape[1], height, width)
    if y2 <= y1 or x2 <= x1:
        raise MediaError(f"a {frame.shape[1]}x{frame.shape[0]} frame is too small to crop to {width}x{height}")
    pixels = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None, :, y1:y2, x1:x2]  # (1, 3, h', w')
    resized = torch.nn.functional.interpolate(pixels, (height, width), mode="bilinear")
    return resized[0].permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class VideoFrames:
    """What `read_video` read, and how: frame i of `frames` is source frame `indices[i]`."""

    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: float | None  # frame rate of `frames` (None: the file states none and none was asked for)
    source_fps: float | None
    source_frames: int  # frames decoded from the file
    indices: tuple[int, ...]


def check_sampling(path: Path, height: int | None, width: int | None, fps: float | None, sample_rate: int) -> None:
    """`read_video`'s size and sampling arguments, checked (a MediaError naming the video)."""
    if (height is None) != (width is None):
        raise MediaError(f"video {path}: give both height and width, or neither (got {height=}, {width=})")
    if height is not None and not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise MediaError(f"video {path}: height and width must be positive integers, got {height!r} x {width!r}")
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate < 1:
        raise MediaError(f"video {path}: sample_rate must be an integer >= 1, got {sample_rate!r}")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise MediaError(f"video {path}: fps must be a positive number, got {fps!r}")
        if sample_rate != 1:
            raise MediaError(f"video {path}: give fps or sample_rate, not both (fps={fps}, sample_rate={sample_rate})")


def read_video(path: str | os.PathLike, height: int | None = None, width: int | None = None,
               fps: float | None = None, sample_rate: int = 1) -> VideoFrames:
    """Decode a video's first video stream to RGB uint8 frames (F, H, W, 3).

    Frames are taken either at `fps` (output frame k is the source frame nearest to time k/fps, so
    24 -> 12 fps keeps frames 0, 2, 4, ...; a higher fps repeats frames) or, as MuseV does, every
    `sample_rate`-th frame. With `height` and `width` each kept frame is centre-crop-resized to that
    size as MuseV does (`crop_resize`); without them frames keep the source size.
    """
    import av  # imported here: only video input needs the codec library

    path = Path(path)
    check_sampling(path, height, width, fps, sample_rate)
    if path.is_dir():
        raise MediaError(f"video {path}: is a folder, not a video file")
    if not path.is_file():
        raise MediaError(f"video {path}: no such file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise MediaError(f"video {path}: not a readable video ({err})") from None
    with container:
        if not container.streams.video:
            raise MediaError(f"video {path}: the file has no video stream")
        stream = container.streams.video[0]
        if height is not None and stream.height and stream.width:
            y1, y2, x1, x2 = crop_box(stream.height, stream.width, height, width)
            if y2 <= y1 or x2 <= x1:
                raise MediaError(f"video {path}: {stream.width}x{stream.height} frames are too small to crop to "
                                 f"{width}x{height}")
        rate = stream.average_rate or stream.guessed_rate
        source_fps = float(rate) if rate else None
        if fps is not None and source_fps is None:
            raise MediaError(f"video {path}: the file states no frame rate, so fps={fps} cannot be honoured; "
                             "use sample_rate instead")
        # source frame of output frame k: nearest to time k / fps (exact fractions), or k * sample_rate
        step = Fraction(rate) / Fraction(fps).limit_denominator(1001) if fps is not None else Fraction(sample_rate)
        wanted = (math.floor(k * step + Fraction(1, 2)) for k in count())
        frames, indices, next_index, decoded = [], [], next(wanted), 0
        try:
            for frame in container.decode(stream):
                if next_index == decoded:
                    array = frame.to_ndarray(format="rgb24")
                    if height is not None:
                        array = crop_resize(array, height, width)
                    while next_index == decoded:  # a frame repeats when fps is above the source's
                        frames.append(array)
                        indices.append(decoded)
                        next_index = next(wanted)
                decoded += 1
        except av.error.FFmpegError as err:
            done = f"decoding failed after {decoded} frames" if decoded else "no frame could be decoded"
            raise MediaError(f"video {path}: {done} ({err})") from None
    if not frames:
        raise MediaError(f"video {path}: no frame could be decoded")
    out_fps = float(fps) if fps is not None else (source_fps / sample_rate if source_fps else None)
    return VideoFrames(np.stack(frames), out_fps, source_fps, decoded, tuple(indices))

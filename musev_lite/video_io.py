"""Images in, videos out: reading and fitting input images, and writing every output atomically.

Every writer puts its bytes under a temporary name in the target folder and renames at the end, so
an interrupted run leaves no half-written file. Videos are consumed as an iterable of uint8 chunks
(n, H, W, 3) so a long video never has to sit in memory as a whole for mp4 or PNG output.
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

from .weights import atomic_path

VIDEO_FORMATS = ("mp4", "gif", "webp", "png")


class MediaError(ValueError):
    """An input image cannot be used or an output cannot be written."""


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB; transparent parts become white (as the original reads images)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"image {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise MediaError(f"image {path}: not a readable image ({err})") from None


def as_pil(image) -> Image.Image:
    """A PIL image, a path, or a uint8 array (H,W,3) -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise MediaError(f"image array must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre-crop to the target aspect ratio, then resize to (width, height) with Lanczos.

    The crop box follows MuseV's image preprocessing (MMCM dynamic_crop_resize_image): the start is
    rounded up and the far edge clipped to size-1, so the last row or column is always dropped.
    Reproduced so the same image gives the same condition latent.
    """
    w, h = image.size
    if w / h >= width / height:
        excess = (w - h * width / height) / 2
        box = (max(0, math.ceil(excess)), 0, min(math.ceil(w - excess), w - 1), h - 1)
    else:
        excess = (h - w * height / width) / 2
        box = (0, max(0, math.ceil(excess)), w - 1, min(math.ceil(h - excess), h - 1))
    return image.crop(box).resize((width, height), resample=Image.Resampling.LANCZOS)


def write_mp4(path: Path, chunks: Iterable[np.ndarray], fps: float) -> int:
    """H.264 / yuv420p mp4 from uint8 chunks (n,H,W,3); odd sizes are padded by one edge pixel."""
    import av  # imported here: only video output needs the codec library

    count = 0
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = None
            for chunk in chunks:
                for frame in chunk:
                    if stream is None:
                        h, w = frame.shape[:2]
                        stream = container.add_stream("libx264", rate=_fps_fraction(fps))
                        stream.width, stream.height = w + w % 2, h + h % 2
                        stream.pix_fmt = "yuv420p"
                        stream.options = {"crf": "17"}
                    if frame.shape[0] % 2 or frame.shape[1] % 2:
                        frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
                    count += 1
            if stream is None:
                raise MediaError(f"{path}: no frames to write")
            container.mux(stream.encode())
    return count


def _fps_fraction(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def write_animation(path: Path, frames: list[Image.Image], fps: float) -> None:
    """Looping GIF or WebP (by suffix) through pillow."""
    duration_ms = max(1, round(1000 / fps))
    fmt = "GIF" if path.suffix.lower() == ".gif" else "WEBP"
    extra = {"lossless": False, "quality": 90} if fmt == "WEBP" else {"disposal": 2}
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format=fmt, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0, **extra)


def write_png_frames(directory: Path, chunks: Iterable[np.ndarray]) -> int:
    """A folder of 00000.png, 00001.png, ...; appears only when complete."""
    count = 0
    with atomic_path(directory, is_dir=True) as tmp:
        for chunk in chunks:
            for frame in chunk:
                Image.fromarray(frame).save(tmp / f"{count:05d}.png")
                count += 1
    return count


def contact_sheet(frames: np.ndarray, columns: int = 4, max_frames: int = 16) -> Image.Image:
    """A grid of up to `max_frames` evenly sampled frames (first and last included)."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    h, w = frames.shape[1:3]
    rows = math.ceil(len(picks) / columns)
    cols = min(columns, len(picks))
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for n, index in enumerate(picks):
        sheet.paste(Image.fromarray(frames[index]), ((n % cols) * w, (n // cols) * h))
    return sheet


def write_image(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def crop_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of the centre region of an h x w picture with the aspect ratio of height x width.

    The arithmetic of MuseV's video crop (MMCM batch_dynamic_crop_resize_images): starts rounded up,
    far edges rounded up then clipped to size-1, and the slice [y1:y2, x1:x2] excludes the far edge,
    so the last row and column are always dropped, even when no crop is needed.
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
        step = Fraction(rate) / _fps_fraction(fps) if fps is not None else Fraction(sample_rate)
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

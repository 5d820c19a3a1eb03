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

"""Pose without mmpose: OpenPose / DWPose keypoint JSON -> OpenPose-style control images, drawn with PIL.

Input is what the common pose tools write. OpenPose's `--write_json` writes one `*_keypoints.json` per frame,
`{"people": [{"pose_keypoints_2d": [x, y, c] * N, "hand_left_keypoints_2d": [x, y, c] * 21,
"hand_right_keypoints_2d": ..., "face_keypoints_2d": ...}]}` with N = 18 (COCO) or 25 (BODY_25, mapped
here to the 18-point layout ControlNet was trained on) in pixels of the source video. sd-webui-controlnet's
and DWPose's exports add `"canvas_width"` / `"canvas_height"` and may give x, y normalised to [0, 1]. Accepted:
a folder of such files (one per frame, in name order) or one file holding a list of frames (or one frame).

Output is the picture ControlNet's dwpose annotator draws (controlnet_aux `dwpose/util.py`, which MuseV's
pose2video uses), at the output size: black; each of the 17 limbs a filled ellipse 4 px in half-width in its
standard colour, the limb layer then dimmed to 0.6; the 18 joints filled circles of radius 4 in full colour;
each hand's 20 bones 2-px lines coloured round the hue circle, its 21 joints blue circles of radius 4. Faces
are not drawn (MuseV's `dwpose_body_hand`). Hidden, as that annotator hides them: body points with confidence
<= 0.3, hand points with confidence < 0.3 (its two tests differ), any point with confidence 0, and hand points
on the top row or left column. The ellipse outlines are OpenCV's `ellipse2Poly` points, so limbs and joints
come out pixel for pixel as the annotator's; the hand lines differ at their edges (PIL's line is not cv2's).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .limits import parse_nested
from .video_io import MediaError

# the 18 body points, OpenPose COCO order: nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist,
# right hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right ear, left ear
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))  # limb i and joint i
# BODY_25 has a mid-hip at 8 (so the hips and legs sit one later) and six foot points at 19-24
BODY_25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
# 21 hand points: the wrist, then four per finger from thumb to little finger, palm to tip
HAND_BONES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
HAND_COLORS = tuple(tuple(round(255 * v) for v in colorsys.hsv_to_rgb(i / 20, 1.0, 1.0)) for i in range(20))
HAND_JOINT_COLOR = (0, 0, 255)
THRESHOLD = 0.3
# How far a shown point may lie from the picture, in canvas sizes (x / width, y / height): pose tools put
# points a little outside the frame, never this far; it keeps the drawing's integer pixels far from overflow
# (100 canvases of a 16384-px output are 1.6e6 px).
MAX_EXTENT = 100.0
LIMB_HALF_WIDTH = 4
JOINT_RADIUS = 4
HAND_LINE_WIDTH = 3  # cv2 thickness 2 covers about 3 px (half-width 1 on each side of the centre pixel)

# sin of whole degrees 0..450 as OpenCV's ellipse table holds them (7 decimals, float32): same outlines
_SIN = np.round(np.sin(np.radians(np.arange(451))), 7).astype(np.float32).astype(np.float64)
_DISC = [(dx, dy) for dy in range(-JOINT_RADIUS, JOINT_RADIUS + 1) for dx in range(-JOINT_RADIUS, JOINT_RADIUS + 1)
         if dx * dx + dy * dy <= JOINT_RADIUS ** 2]  # the pixels of cv2's filled circle


class PoseError(MediaError):
    """Keypoint JSON that cannot be used."""


@dataclass
class PoseFrame:
    """One frame's people. Points are rows (x, y, confidence), x and y as fractions of the canvas."""

    bodies: list[np.ndarray]  # each (18, 3)
    hands: list[np.ndarray]  # each (21, 3): every person's left hand, then every right hand (as DWPose draws)
    canvas: tuple[int, int] | None  # (height, width) the keypoints were found on; None: unknown


def read_keypoints(path: str | os.PathLike, canvas: tuple[int, int] | None = None) -> list[PoseFrame]:
    """Keypoint JSON -> one PoseFrame per frame.

    `path` is a folder of per-frame `*.json` files (name order, numbers compared as numbers) or one file
    with a list of frames or a single frame. x and y are taken as normalised when every shown point of a
    frame lies within [-1.5, 1.5], else as pixels of the canvas: `canvas_width` / `canvas_height` of the
    file, or else `canvas` = (height, width) of the source video (OpenPose's own files state no size).
    """
    path = Path(path)
    if canvas is not None and not (len(canvas) == 2 and all(isinstance(v, int) and v > 0 for v in canvas)):
        raise PoseError(f"keypoints {path}: canvas must be (height, width) in pixels, got {canvas!r}")
    if path.is_dir():
        number_order = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
        files = sorted(path.glob("*.json"), key=number_order)
        if not files:
            raise PoseError(f"keypoint folder {path}: no *.json files in it")
        return [_frame(_load(file), str(file), canvas) for file in files]
    if not path.is_file():
        raise PoseError(f"keypoints {path}: no such file or folder")
    data = _load(path)
    if isinstance(data, dict):
        return [_frame(data, str(path), canvas)]
    if not isinstance(data, list) or not data:
        raise PoseError(f"keypoints {path}: expected a frame {{\"people\": [...]}} or a non-empty list of frames, "
                        f"got {type(data).__name__ if data else 'an empty list'}")
    return [_frame(frame, f"{path} frame {i}", canvas) for i, frame in enumerate(data)]


def draw_pose(frame: PoseFrame, height: int, width: int, threshold: float = THRESHOLD) -> np.ndarray:
    """The OpenPose-style control image (height, width, 3) uint8 of one frame.

    A canvas of another aspect ratio is centre-cropped to the output's, as a pose video of that size would
    be; with no canvas known the normalised points are stretched to the output size.
    """
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise PoseError(f"pose image size must be positive integers, got {height!r} x {width!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise PoseError(f"pose threshold must be a number >= 0, got {threshold!r}")
    if frame.canvas is None:
        scale, offset = np.array([width, height], float), np.zeros(2)
    else:
        ch, cw = frame.canvas
        cover = max(width / cw, height / ch)  # the canvas, scaled to cover the output, then centred
        scale, offset = np.array([cw, ch]) * cover, (np.array([width, height]) - np.array([cw, ch]) * cover) / 2
    bodies = [body[:, :2] * scale + offset for body in frame.bodies]
    shown = [(body[:, 2] > threshold) & (body[:, 2] > 0) for body in frame.bodies]

    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for (a, b), color in zip(LIMBS, COLORS):  # limb by limb over all people, as the annotator overlaps them
        for xy, ok in zip(bodies, shown):
            if ok[a] and ok[b]:
                draw.polygon(_limb_outline(xy[a], xy[b]), fill=color)
    image = Image.fromarray((np.asarray(image) * 0.6).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for i, color in enumerate(COLORS):
        for xy, ok in zip(bodies, shown):
            if ok[i]:
                _joint(draw, xy[i], color)
    for hand in frame.hands:
        xy = np.trunc(hand[:, :2] * scale + offset)
        ok = (hand[:, 2] >= threshold) & (hand[:, 2] > 0) & (xy > 0).all(axis=1)
        for (a, b), color in zip(HAND_BONES, HAND_COLORS):
            if ok[a] and ok[b]:
                draw.line([tuple(xy[a]), tuple(xy[b])], fill=color, width=HAND_LINE_WIDTH)
        for point in xy[ok]:
            _joint(draw, point, HAND_JOINT_COLOR)
    return np.array(image)


def render_keypoints(path: str | os.PathLike, height: int, width: int, canvas: tuple[int, int] | None = None,
                     threshold: float = THRESHOLD) -> np.ndarray:
    """Keypoint JSON (a folder or one file, see read_keypoints) -> control video (F, height, width, 3) uint8."""
    return np.stack([draw_pose(frame, height, width, threshold) for frame in read_keypoints(path, canvas)])


def _limb_outline(p: np.ndarray, q: np.ndarray) -> list[tuple[int, int]]:
    """The polygon cv2.ellipse2Poly gives for the annotator's limb ellipse from p to q (x, y pixels):
    centre and half-length truncated to whole pixels, angle to whole degrees, one point per degree."""
    length = ((p[1] - q[1]) ** 2 + (p[0] - q[0]) ** 2) ** 0.5
    angle = int(math.degrees(math.atan2(p[1] - q[1], p[0] - q[0]))) % 360
    cx, cy, a, b = int((p[0] + q[0]) / 2), int((p[1] + q[1]) / 2), int(length / 2), LIMB_HALF_WIDTH
    t = np.arange(361)
    x, y = a * _SIN[450 - t], b * _SIN[t]  # the ellipse's own axes, then rotated by `angle`
    px = np.rint(cx + x * _SIN[450 - angle] - y * _SIN[angle]).astype(int)
    py = np.rint(cy + x * _SIN[angle] + y * _SIN[450 - angle]).astype(int)
    points = [(int(px[0]), int(py[0]))]
    for point in zip(px[1:].tolist(), py[1:].tolist()):
        if point != points[-1]:
            points.append(point)
    return points


def _joint(draw: ImageDraw.ImageDraw, xy: np.ndarray, color: tuple[int, int, int]) -> None:
    x, y = int(xy[0]), int(xy[1])
    draw.point([(x + dx, y + dy) for dx, dy in _DISC], fill=color)


def _load(path: Path):
    try:
        return parse_nested(json.loads, path.read_text(encoding="utf-8"), f"keypoints {path}", PoseError)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PoseError(f"keypoints {path}: not valid JSON ({err})") from None


def _frame(data, where: str, canvas: tuple[int, int] | None) -> PoseFrame:
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise PoseError(f"keypoints {where}: no \"people\" list (OpenPose keypoint JSON is "
                        "{\"people\": [{\"pose_keypoints_2d\": [x, y, c, ...]}, ...]})")
    if "canvas_width" in data or "canvas_height" in data:
        sizes = [data.get("canvas_height"), data.get("canvas_width")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in sizes):
            raise PoseError(f"keypoints {where}: canvas_height / canvas_width must both be positive numbers, "
                            f"got {sizes[0]!r} / {sizes[1]!r}")
        canvas = (round(sizes[0]), round(sizes[1]))
    bodies, lefts, rights, named = [], [], [], []  # named: (key, points) of every part, as the frame holds them
    for n, person in enumerate(data["people"]):
        fields = ("pose_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d")
        if not isinstance(person, dict) or not any(f in person for f in fields):
            raise PoseError(f"keypoints {where}: people[{n}] has none of {', '.join(fields)}")
        body = _points(person, fields[0], (18, 25), f"{where}: people[{n}]")
        if body is not None:
            bodies.append(body[list(BODY_25_TO_18)] if len(body) == 25 else body)
            named.append((f"people[{n}].{fields[0]}", bodies[-1]))
        for field, hands in zip(fields[1:], (lefts, rights)):
            hand = _points(person, field, (21,), f"{where}: people[{n}]")
            if hand is not None:
                hands.append(hand)
                named.append((f"people[{n}].{field}", hand))
    frame = PoseFrame(bodies, lefts + rights, canvas)
    shown = np.concatenate(bodies + lefts + rights + [np.zeros((0, 3))])
    shown = shown[shown[:, 2] > 0, :2]
    if shown.size and np.abs(shown).max() > 1.5:  # pixels (a normalised pose stays near [0, 1])
        if canvas is None:
            raise PoseError(f"keypoints {where}: pixel coordinates but no canvas size; add \"canvas_width\" and "
                            "\"canvas_height\" to the JSON or give the size of the video the keypoints were found on")
        for points in frame.bodies + frame.hands:
            points[:, :2] /= (canvas[1], canvas[0])
    for key, points in named:
        far = points[(points[:, 2] > 0) & (np.abs(points[:, :2]) > MAX_EXTENT).any(axis=1)]
        if len(far):
            raise PoseError(f"keypoints {where}: {key} has a point at x, y = {far[0, 0]:g}, {far[0, 1]:g} canvas sizes, "
                            f"beyond the {MAX_EXTENT:g} canvas sizes a point may lie from the picture; fix the file or "
                            "give that point confidence 0")
    return frame


def _points(person: dict, field: str, counts: tuple[int, ...], where: str) -> np.ndarray | None:
    """person[field] as (n, 3) rows x, y, c; None when absent or empty (OpenPose writes [] for parts it skips)."""
    values = person.get(field)
    if values is None or values == []:
        return None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise PoseError(f"keypoints {where}.{field} must be a list of numbers x, y, confidence, ...")
    if len(values) not in [3 * n for n in counts]:
        expected = " or ".join(f"{3 * n} ({n} points)" for n in counts)
        raise PoseError(f"keypoints {where}.{field} has {len(values)} numbers; expected {expected}")
    points = np.array(values, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(points).all():
        raise PoseError(f"keypoints {where}.{field} holds a non-finite number")
    return points

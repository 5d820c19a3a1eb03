"""Keypoint JSON -> OpenPose-style control images: layout, colours, hiding, formats, errors, annotator parity."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from musev_lite.pose import (
    BODY_25_TO_18, COLORS, HAND_BONES, HAND_COLORS, LIMBS, PoseError, PoseFrame, draw_pose, read_keypoints,
    render_keypoints)

# a spread-out figure on a 256 x 256 canvas (pixels, OpenPose COCO-18 order): limbs long and apart
FIGURE = np.array([[128, 60], [128, 110], [80, 110], [40, 150], [20, 200], [176, 110], [216, 150], [236, 200],
                   [100, 180], [90, 220], [80, 250], [156, 180], [166, 220], [176, 250], [110, 40], [146, 40],
                   [90, 20], [166, 20]], dtype=float)


def body_json(points=FIGURE, confidence=None):
    c = np.full(len(points), 0.9) if confidence is None else confidence
    return np.column_stack([points, c]).ravel().tolist()


def frame_json(people, **extra):
    return {"people": people, **extra}


def write(path, content):
    path.write_text(json.dumps(content))
    return path


def segment_distance(px, p, q):
    """Distance of pixel centres px (n, 2) to the segment p-q."""
    d = q - p
    t = np.clip(((px - p) @ d) / max(d @ d, 1e-9), 0, 1)
    return np.linalg.norm(px - (p + t[:, None] * d), axis=1)


def dimmed(color):
    return tuple((np.array(color) * 0.6).astype(np.uint8).tolist())


def test_limb_colours_at_midpoints_and_nothing_elsewhere(tmp_path):
    frame = frame_json([{"pose_keypoints_2d": body_json()}], canvas_width=256, canvas_height=256)
    image = render_keypoints(write(tmp_path / "f.json", frame), 256, 256)[0]
    for (a, b), color in zip(LIMBS, COLORS):
        x, y = ((FIGURE[a] + FIGURE[b]) / 2).astype(int)
        assert tuple(image[y, x]) == dimmed(color), f"limb {a}-{b}"
    for (x, y), color in zip(FIGURE.astype(int), COLORS):
        assert tuple(image[y, x]) == color  # joints in full colour, on top of the limbs
    ys, xs = np.mgrid[0:256, 0:256]
    centres = np.column_stack([xs.ravel(), ys.ravel()]).astype(float)
    near = np.zeros(len(centres), bool)
    for a, b in LIMBS:
        near |= segment_distance(centres, FIGURE[a], FIGURE[b]) <= 6  # half-width 4, whole-pixel rounding
    for point in FIGURE:
        near |= np.linalg.norm(centres - point, axis=1) <= 5.5  # radius 4 around the truncated centre
    drawn = image.reshape(-1, 3).any(1)
    assert drawn[near].mean() > 0.5 and not drawn[~near].any()


def test_hands_bone_colours_and_blue_joints():
    hand = np.zeros((21, 3))
    hand[:, 2] = 1
    hand[0, :2] = (0.5, 0.9)
    for finger in range(5):  # fingers fanning upwards, bones 12 px long
        angle = np.radians(-150 + 30 * finger)
        for k in range(1, 5):
            hand[1 + 4 * finger + k - 1, :2] = hand[0, :2] + k * 12 / 256 * np.array([np.cos(angle), np.sin(angle)])
    image = draw_pose(PoseFrame([], [hand], None), 256, 256)
    xy = np.trunc(hand[:, :2] * 256).astype(int)
    assert all(tuple(image[y, x]) == (0, 0, 255) for x, y in xy)
    for (a, b), color in zip(HAND_BONES, HAND_COLORS):
        x, y = (xy[a] + xy[b]) // 2
        if np.linalg.norm(xy[a] - xy[b]) > 10:  # the joints' circles cover short bones
            assert tuple(image[y, x]) == color, f"bone {a}-{b}"


def test_low_confidence_points_are_hidden():
    confidence = np.full(18, 0.9)
    confidence[4] = 0.2  # right wrist: hidden, with the forearm
    confidence[10] = 0.3  # right ankle: the body needs more than 0.3
    body = np.column_stack([FIGURE / 256, confidence])
    image = draw_pose(PoseFrame([body], [], None), 256, 256)
    for a, b in ((3, 4), (9, 10)):
        x, y = ((FIGURE[a] + FIGURE[b]) / 2).astype(int)
        assert tuple(image[y, x]) == (0, 0, 0)
        x, y = FIGURE[b].astype(int)
        assert tuple(image[y, x]) == (0, 0, 0)
    x, y = ((FIGURE[2] + FIGURE[3]) / 2).astype(int)
    assert tuple(image[y, x]) == dimmed(COLORS[2])  # the upper arm stays
    # a lower threshold shows them; confidence 0 (OpenPose's "not found") stays hidden even at threshold 0
    assert tuple(draw_pose(PoseFrame([body], [], None), 256, 256, threshold=0.1)[200, 20]) == COLORS[4]
    body[4, 2] = 0
    assert tuple(draw_pose(PoseFrame([body], [], None), 256, 256, threshold=0)[200, 20]) == (0, 0, 0)
    # hands: shown from 0.3 on; hidden below, at confidence 0, and on the left column
    hand = np.column_stack([np.linspace(0.3, 0.7, 21), np.full(21, 0.5), np.full(21, 0.3)])
    hand[5, 2], hand[9, 2], hand[13, 0] = 0.29, 0.0, 0.001
    image = draw_pose(PoseFrame([], [hand], None), 256, 256)
    xy = np.trunc(hand[:, :2] * 256).astype(int)
    shown = [tuple(image[y, x]) == (0, 0, 255) for x, y in xy]
    assert shown == [i not in (5, 9, 13) for i in range(21)]


def test_body_25_is_mapped_to_the_18_point_layout(tmp_path):
    body25 = np.zeros((25, 2))
    body25[list(BODY_25_TO_18)] = FIGURE
    body25[8] = (128, 180)  # mid-hip
    body25[19:] = [(70, 255), (60, 255), (80, 252), (186, 255), (196, 255), (176, 252)]  # feet
    frames = [frame_json([{"pose_keypoints_2d": body_json(points)}], canvas_width=256, canvas_height=256)
              for points in (body25, FIGURE)]
    ours = [read_keypoints(write(tmp_path / f"{i}.json", frame))[0] for i, frame in enumerate(frames)]
    assert np.array_equal(ours[0].bodies[0], ours[1].bodies[0])
    assert np.array_equal(draw_pose(ours[0], 128, 128), draw_pose(ours[1], 128, 128))


def test_normalised_and_pixel_coordinates_agree(tmp_path):
    hand = np.column_stack([np.linspace(40, 90, 21), np.linspace(150, 200, 21), np.ones(21)])
    pixels = {"pose_keypoints_2d": body_json(), "hand_right_keypoints_2d": hand.ravel().tolist()}
    normalised = {"pose_keypoints_2d": body_json(FIGURE / 256),
                  "hand_right_keypoints_2d": (hand / [256, 256, 1]).ravel().tolist()}
    with_canvas = [frame_json([p], canvas_width=256, canvas_height=256) for p in (pixels, normalised)]
    paths = [write(tmp_path / f"{i}.json", frame) for i, frame in enumerate(with_canvas)]
    images = [draw_pose(read_keypoints(path)[0], 192, 192) for path in paths]
    assert np.array_equal(images[0], images[1]) and images[0].any()
    # OpenPose's own files state no canvas: pixel coordinates then need the video size
    write(tmp_path / "openpose.json", frame_json([pixels]))
    with pytest.raises(PoseError, match=r"openpose.json: pixel coordinates but no canvas size"):
        read_keypoints(tmp_path / "openpose.json")
    given = read_keypoints(tmp_path / "openpose.json", canvas=(256, 256))[0]
    assert np.array_equal(draw_pose(given, 192, 192), images[0])
    # normalised points without a canvas are stretched to the output size
    stretched = read_keypoints(write(tmp_path / "stretched.json", frame_json([normalised])))[0]
    assert stretched.canvas is None and np.array_equal(draw_pose(stretched, 192, 192), images[0])


def test_canvas_of_another_shape_is_centre_cropped():
    # canvas 100 high, 200 wide -> 50 x 50 output: the middle 100 x 100 square, halved
    body = np.zeros((18, 3))
    body[0] = (100 / 200, 50 / 100, 1.0)  # nose at the centre
    body[14] = (60 / 200, 20 / 100, 1.0)  # right eye 10 px right of the square's left edge, 20 down
    image = draw_pose(PoseFrame([body], [], (100, 200)), 50, 50)
    assert tuple(image[25, 25]) == COLORS[0] and tuple(image[10, 5]) == COLORS[14]
    outside = np.zeros((18, 3))
    outside[17] = (20 / 200, 50 / 100, 1.0)  # left ear 30 px left of the square: cropped away
    assert not draw_pose(PoseFrame([outside], [], (100, 200)), 50, 50).any()
    assert draw_pose(PoseFrame([outside], [], None), 50, 50).any()  # stretched instead, it shows


def test_folder_and_single_file_give_the_same_frames(tmp_path):
    rng = np.random.default_rng(0)
    frames = [frame_json([{"pose_keypoints_2d": body_json(FIGURE + rng.normal(0, 5, FIGURE.shape))}],
                         canvas_width=256, canvas_height=256) for _ in range(11)]
    folder = tmp_path / "keypoints"
    folder.mkdir()
    for i, frame in enumerate(frames):  # no zero padding: frame 10 must come after frame 9
        (folder / f"clip_{i}_keypoints.json").write_text(json.dumps(frame))
    (tmp_path / "all.json").write_text(json.dumps(frames))
    from_folder = render_keypoints(folder, 64, 64)
    from_file = render_keypoints(tmp_path / "all.json", 64, 64)
    assert from_folder.shape == (11, 64, 64, 3) and np.array_equal(from_folder, from_file)
    single = render_keypoints(folder / "clip_10_keypoints.json", 64, 64)
    assert np.array_equal(single[0], from_file[10])
    assert not np.array_equal(from_file[9], from_file[10])


def test_matches_the_dwpose_annotator():
    """Against controlnet_aux's DWPose drawing (MuseV's fork) of the same keypoints (tests/make_fixtures.py
    pose). Limbs, body joints and hand joints are drawn pixel for pixel alike; the 2-px hand lines are cv2's
    in the reference and PIL's here, whose edges differ: tolerance 3% of the drawn pixels, every difference
    on a hand bone (a hand-line colour on one side)."""
    frames = read_keypoints(FIXTURES / "pose/frames.json")
    bone = {tuple(c) for c in HAND_COLORS}
    for i, frame in enumerate(frames):
        reference = np.asarray(Image.open(FIXTURES / f"pose/frame{i}.png").convert("RGB"))
        ours = draw_pose(frame, *reference.shape[:2])
        differ = (ours != reference).any(-1)
        fraction = differ.sum() / reference.any(-1).sum()
        print(f"frame {i}: {differ.sum()} pixels differ, {fraction:.2%} of the drawn ones")
        assert fraction <= 0.03
        on_bones = [tuple(a) in bone or tuple(b) in bone for a, b in zip(ours[differ], reference[differ])]
        assert all(on_bones)
        if not frame.hands:
            assert fraction == 0


@pytest.mark.parametrize("content, message", [
    ({"persons": []}, r"f.json: no \"people\" list"),
    ({"people": {}}, r"f.json: no \"people\" list"),
    ({"people": [{"face_keypoints_2d": [1, 2, 3]}]}, r"f.json: people\[0\] has none of pose_keypoints_2d"),
    ({"people": [{"pose_keypoints_2d": [0.5] * 51}]}, r"f.json: people\[0\].pose_keypoints_2d has 51 numbers; "
                                                      r"expected 54 \(18 points\) or 75 \(25 points\)"),
    ({"people": [{"hand_left_keypoints_2d": [0.5] * 60}]},
     r"people\[0\].hand_left_keypoints_2d has 60 numbers; expected 63"),
    ({"people": [{"pose_keypoints_2d": ["1"] * 54}]}, r"people\[0\].pose_keypoints_2d must be a list of numbers"),
    ({"people": [{"pose_keypoints_2d": [float("nan")] * 54}]}, "non-finite"),
    ({"people": [], "canvas_width": 0, "canvas_height": 64}, "canvas_height / canvas_width must both be positive"),
    ({"people": [], "canvas_width": 64}, "canvas_height / canvas_width must both be positive"),
    ([], "expected a frame .* or a non-empty list of frames, got an empty list"),
    ([{"people": []}, {"people": [{"pose_keypoints_2d": [1] * 9}]}],
     r"f.json frame 1: people\[0\].pose_keypoints_2d has 9"),
])
def test_bad_keypoint_json(tmp_path, content, message):
    (tmp_path / "f.json").write_text(json.dumps(content))
    with pytest.raises(PoseError, match=message):
        read_keypoints(tmp_path / "f.json")


def test_bad_paths_and_arguments(tmp_path):
    with pytest.raises(PoseError, match="missing: no such file or folder"):
        read_keypoints(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoseError, match="empty: no \\*.json files"):
        read_keypoints(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{people: ")
    with pytest.raises(PoseError, match="bad.json: not valid JSON"):
        read_keypoints(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text(json.dumps({"people": []}))
    with pytest.raises(PoseError, match="canvas must be \\(height, width\\)"):
        read_keypoints(tmp_path / "ok.json", canvas=(0, 64))
    frame = read_keypoints(tmp_path / "ok.json")[0]
    assert not draw_pose(frame, 8, 8).any()  # nobody: a black frame
    with pytest.raises(PoseError, match="positive integers"):
        draw_pose(frame, 0, 8)
    with pytest.raises(PoseError, match="threshold must be a number >= 0"):
        draw_pose(frame, 8, 8, threshold=-1)

"""GridNav renderer: shape, determinism, what the camera sees."""

import math

import numpy as np

from vlmtrain.envs.gridnav import (PALETTE, GridObject, Layout, Pose, decode_jpeg, encode_jpeg,
                                   make_episode, observe, render)


def _one_box_layout(color: str = "red") -> Layout:
    return Layout(6.0, 6.0, (GridObject(4.0, 3.0, 0.5, 1.0, color),), (170, 165, 160),
                  (100, 96, 90))


def _colour_fraction(img: np.ndarray, color: str, min_cos: float = 0.95) -> float:
    """Fraction of pixels whose RGB direction is close to the palette colour (shading-invariant)."""
    px = img.reshape(-1, 3).astype(np.float64)
    ref = np.asarray(PALETTE[color], dtype=np.float64)
    norm = np.linalg.norm(px, axis=1) + 1e-9
    cos = (px @ ref) / (norm * np.linalg.norm(ref))
    return float(((cos > min_cos) & (norm > 0.4 * np.linalg.norm(ref))).mean())


def test_shape_dtype_determinism() -> None:
    s = make_episode(0, "train", 1)
    a = render(s.layout, s.start)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render(s.layout, s.start))
    assert render(s.layout, s.start, size=32).shape == (32, 32, 3)
    o = observe(s.layout, s.start, 32)
    assert o.shape == (32, 32, 3) and o.dtype == np.uint8
    assert np.array_equal(o, decode_jpeg(encode_jpeg(render(s.layout, s.start, 32))))


def test_goal_colour_dominates_centre_when_facing_box() -> None:
    for color in PALETTE:
        lay = _one_box_layout(color)
        img = observe(lay, Pose(2.5, 3.0, 0.0), 64)
        centre = img[:, 28:36]
        assert _colour_fraction(centre, color) > 0.35, color
        others = [_colour_fraction(centre, c) for c in PALETTE if c != color]
        assert _colour_fraction(centre, color) > 2 * max(others), color
        # Facing away: no box colour in view.
        away = observe(lay, Pose(2.5, 3.0, math.pi), 64)
        assert _colour_fraction(away, color) < 0.01


def test_turning_shifts_box() -> None:
    lay = _one_box_layout("blue")
    p = Pose(2.5, 3.0, 0.0)

    def box_centre_col(img: np.ndarray) -> float:
        cols = np.nonzero((img[:, :, 2] > 150) & (img[:, :, 0] < 90))[1]
        return float(cols.mean())

    c0 = box_centre_col(render(lay, p))
    c_left = box_centre_col(render(lay, Pose(p.x, p.y, math.radians(15))))
    c_right = box_centre_col(render(lay, Pose(p.x, p.y, -math.radians(15))))
    # Turning LEFT moves the scene (and the box) to the right of the image, and vice versa.
    assert c_left > c0 + 5 and c_right < c0 - 5


def test_nearer_box_occludes_farther() -> None:
    near = GridObject(3.5, 3.0, 0.5, 1.0, "red")
    far = GridObject(5.0, 3.0, 0.5, 1.0, "green")
    lay = Layout(6.0, 6.0, (far, near), (170, 165, 160), (100, 96, 90))
    img = render(lay, Pose(2.0, 3.0, 0.0))
    # The lowest rows of the centre columns show the near box's side, not the far one.
    assert _colour_fraction(img[50:, 30:34], "red") > 0.9
    # The far box's top still peeks out above the near one.
    assert _colour_fraction(img[:, 30:34], "green") > 0.02


def test_inside_box_is_skipped() -> None:
    lay = _one_box_layout("red")
    pose = Pose(4.0, 3.0, 0.0)  # the box's centre
    img = render(lay, pose)
    assert img.shape == (64, 64, 3)
    assert _colour_fraction(img, "red") < 0.01
    # The box is skipped entirely: the view is that of the empty room.
    empty = Layout(lay.width, lay.depth, (), lay.wall_rgb, lay.floor_rgb)
    assert np.array_equal(img, render(empty, pose))
    # Hand-computed: the top row is ceiling (205, 205, 212); just above the horizon the centre
    # columns see the +x wall 2 m away, tone 1.0, shaded 1 - 0.05 * 2 = 0.9 of (170, 165, 160).
    assert (img[0] == (205, 205, 212)).all()
    assert np.abs(img[31, 30:34].astype(int) - (153, 148, 144)).max() <= 1
    # Facing -y the wall is 3 m away and has tone 0.7: 0.7 * 0.85 = 0.595 of (170, 165, 160).
    down = render(empty, Pose(4.0, 3.0, -math.pi / 2))
    assert np.abs(down[31, 30:34].astype(int) - (101, 98, 95)).max() <= 1

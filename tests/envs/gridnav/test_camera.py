"""The pitched GridNav camera (envs/gridnav/camera.py): its renderer against the zero-pitch one, floor
points to pixels and back against hand-derived pinhole geometry, occlusion by boxes, and the pixel
goal of a trajectory (the farthest later position the look-down camera sees)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmtrain.envs.gridnav.camera import floor_pixel, pixel_floor_point, pixel_goal, render_pitched
from vlmtrain.envs.gridnav.expert import make_episode
from vlmtrain.envs.gridnav.render import render
from vlmtrain.envs.gridnav.world import GridObject, Layout, Pose

EMPTY = Layout(width=6.0, depth=6.0, wall_rgb=(150, 140, 130), floor_rgb=(120, 110, 100), objects=())
H, PITCH, SIZE = 1.25, 30.0, 64


def test_pitch_zero_matches_the_column_renderer():
    """At zero pitch the per-pixel ray caster draws what the column renderer draws (up to rounding at
    the edges of surfaces), on real episodes with boxes."""
    for i in range(3):
        spec = make_episode(0, "train", i)
        a = render(spec.layout, spec.start, SIZE).astype(int)
        b = render_pitched(spec.layout, spec.start, SIZE, 0.0).astype(int)
        assert (np.abs(a - b).max(axis=-1) > 10).mean() < 0.005


def test_a_pitched_view_shows_more_floor():
    spec = make_episode(0, "train", 0)
    floor = np.asarray(spec.layout.floor_rgb, dtype=float)

    def floor_share(img):  # share of pixels with the floor colour's chromaticity (any shading)
        rel = img.astype(float) / np.maximum(img.astype(float).sum(-1, keepdims=True), 1)
        return float((np.abs(rel - floor / floor.sum()).sum(-1) < 0.02).mean())

    level = render_pitched(spec.layout, spec.start, SIZE, 0.0)
    down = render_pitched(spec.layout, spec.start, SIZE, 30.0)
    assert floor_share(down) > floor_share(level) + 0.1


def test_floor_point_straight_ahead_on_the_optical_axis_is_the_image_centre():
    pose = Pose(1.0, 3.0, 0.0)
    ahead = H / math.tan(math.radians(PITCH))  # where the optical axis meets the floor
    u, v = floor_pixel(EMPTY, pose, (1.0 + ahead, 3.0), SIZE, PITCH)
    assert (u, v) == pytest.approx((SIZE / 2, SIZE / 2))


def test_floor_pixel_matches_hand_geometry_and_inverts():
    """A floor point 2 m ahead and 0.5 m to the left: depression angle atan(1.25 / 2), so the row is
    f * tan(depression - pitch) below the centre on a camera rotated about its x axis; the column
    follows from the point's lateral offset over its depth along the optical axis."""
    pose = Pose(1.0, 3.0, 0.0)
    f = SIZE / 2 / math.tan(math.radians(45))
    p = math.radians(PITCH)
    depth = 2.0 * math.cos(p) + H * math.sin(p)  # along the optical axis
    down = -2.0 * math.sin(p) + H * math.cos(p)  # along the image's down axis
    u, v = floor_pixel(EMPTY, pose, (3.0, 3.5), SIZE, PITCH)
    assert u == pytest.approx(SIZE / 2 - f * 0.5 / depth)
    assert v == pytest.approx(SIZE / 2 + f * down / depth)
    assert pixel_floor_point(pose, u, v, SIZE, PITCH) == pytest.approx((3.0, 3.5))
    rng = np.random.default_rng(0)
    for _ in range(50):
        pose = Pose(float(rng.uniform(1, 5)), float(rng.uniform(1, 5)), float(rng.uniform(-math.pi, math.pi)))
        uv = rng.uniform(0, SIZE, size=2)
        point = pixel_floor_point(pose, uv[0], uv[1], SIZE, PITCH)
        if point is None:  # a ray at or above the horizon
            continue
        assert floor_pixel(EMPTY, pose, point, SIZE, PITCH) == pytest.approx(tuple(uv))


def test_points_out_of_view_or_behind_a_box_have_no_pixel():
    pose = Pose(1.0, 3.0, 0.0)
    assert floor_pixel(EMPTY, pose, (0.5, 3.0), SIZE, PITCH) is None  # behind
    assert floor_pixel(EMPTY, pose, (1.2, 3.0), SIZE, PITCH) is None  # under the camera, below the image
    assert floor_pixel(EMPTY, pose, (3.0, 5.9), SIZE, PITCH) is None  # far to the left, outside 90 degrees
    boxed = Layout(width=6.0, depth=6.0, wall_rgb=EMPTY.wall_rgb, floor_rgb=EMPTY.floor_rgb,
                   objects=(GridObject(x=2.5, y=3.0, size=0.5, height=1.0, color="red"),))
    assert floor_pixel(EMPTY, pose, (4.0, 3.0), SIZE, PITCH) is not None
    assert floor_pixel(boxed, pose, (4.0, 3.0), SIZE, PITCH) is None  # the box hides it
    assert pixel_floor_point(pose, SIZE / 2, 0.0, SIZE, 30.0) is None  # the top row of a 30 degree pitch: at the horizon


def test_pixel_goal_is_the_farthest_later_position_in_view():
    """Walking straight along +x from x=1 in 0.25 m steps: the look-down camera (90 degrees, pitched
    30) sees the floor from 1.25 / tan(75 deg) = 0.335 m ahead out to the wall; the goal of frame 0 is
    the last frame. Turning in place first: no later position is in view at the start."""
    straight = [Pose(1.0 + 0.25 * k, 3.0, 0.0) for k in range(12)]
    gid, (u, v) = pixel_goal(EMPTY, straight, 0, SIZE, PITCH)
    assert gid == 11
    assert pixel_floor_point(straight[0], u, v, SIZE, PITCH) == pytest.approx((straight[11].x, 3.0))
    assert pixel_goal(EMPTY, straight, 10, SIZE, PITCH)[0] == -1  # 0.25 m ahead is below the image
    turn = math.radians(15)
    turning = [Pose(1.0, 3.0, -turn * k) for k in range(7)] + [Pose(1.0, 3.0 - 0.25 * k, -math.pi / 2)
                                                              for k in range(1, 8)]
    assert pixel_goal(EMPTY, turning, 0, SIZE, PITCH) == (-1, (-1.0, -1.0))
    assert pixel_goal(EMPTY, turning, 6, SIZE, PITCH)[0] == 7  # facing the walk: its last frame

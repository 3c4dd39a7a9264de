"""A pitched GridNav camera: its rays, a per-pixel renderer, and floor points to pixels and back.

The zero-pitch renderer (``render.render``) draws walls column by column, which holds only while
vertical lines stay vertical on screen. A camera pitched down (InternData-N1's look-down settings,
e.g. ``125cm_30deg``) needs one ray per pixel: :func:`render_pitched` intersects every pixel's ray with
the floor, the ceiling, the four walls and the boxes, nearest first, and shades them as ``render``
does. Pixel goals use the same camera: :func:`floor_pixel` projects a floor point into the image (or
says it is out of view or hidden behind a box), :func:`pixel_floor_point` casts a pixel back onto the
floor.

Camera frame: looking along the heading, pitched down by ``pitch_deg``; image column ``u`` grows to
the right, row ``v`` downward, pixel centres at ``+0.5``; square pixels, horizontal and vertical field
of view ``hfov_deg``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .render import _FLOOR_TILE, _WALL_TONE, CEILING_RGB, WALL_HEIGHT, _shade
from .world import PALETTE, Layout, Pose

_EPS = 1e-9


def camera_basis(pose: Pose, pitch_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(forward, right, down) unit vectors of a camera at ``pose`` pitched down by ``pitch_deg``."""
    h, p = pose.heading, math.radians(pitch_deg)
    forward = np.array([math.cos(h) * math.cos(p), math.sin(h) * math.cos(p), -math.sin(p)])
    right = np.array([math.sin(h), -math.cos(h), 0.0])
    down = np.array([-math.cos(h) * math.sin(p), -math.sin(h) * math.sin(p), -math.cos(p)])
    return forward, right, down


def pixel_rays(pose: Pose, size: int, pitch_deg: float, hfov_deg: float = 90.0) -> np.ndarray:
    """(size, size, 3) world directions (not normalised) of every pixel's ray, row-major."""
    forward, right, down = camera_basis(pose, pitch_deg)
    tan_half = math.tan(math.radians(hfov_deg) / 2)
    offs = ((np.arange(size) + 0.5) / size * 2 - 1) * tan_half
    return (forward[None, None, :] + offs[None, :, None] * right[None, None, :]
            + offs[:, None, None] * down[None, None, :])


def render_pitched(layout: Layout, pose: Pose, size: int = 64, pitch_deg: float = 30.0,
                   hfov_deg: float = 90.0, camera_height: float = 1.25) -> np.ndarray:
    """The view of a camera at ``pose`` and ``camera_height`` pitched down by ``pitch_deg``, as a
    (size, size, 3) uint8 RGB image: floor checker, shaded walls, ceiling and shaded boxes."""
    d = pixel_rays(pose, size, pitch_deg, hfov_deg).reshape(-1, 3)
    d = np.where(np.abs(d) < _EPS, _EPS, d)  # no exact zeros in the slab tests
    ox, oy, oz = pose.x, pose.y, camera_height
    t_floor = np.where(d[:, 2] < 0, -oz / d[:, 2], np.inf)
    t_ceil = np.where(d[:, 2] > 0, (WALL_HEIGHT - oz) / d[:, 2], np.inf)
    tx = np.where(d[:, 0] > 0, (layout.width - ox) / d[:, 0], -ox / d[:, 0])
    ty = np.where(d[:, 1] > 0, (layout.depth - oy) / d[:, 1], -oy / d[:, 1])
    t_wall = np.minimum(tx, ty)
    wall_id = np.where(tx < ty, np.where(d[:, 0] > 0, 0, 1), np.where(d[:, 1] > 0, 2, 3))
    horiz = np.hypot(d[:, 0], d[:, 1])  # metres on the floor plane per unit of t

    img = np.empty((size * size, 3))
    img[:] = CEILING_RGB
    wall = (t_wall < t_floor) & (t_wall < t_ceil)
    wall_rgb = np.asarray(layout.wall_rgb, dtype=np.float64)
    wall_shade = _WALL_TONE[wall_id] * _shade(t_wall * horiz, 0.05, 0.55)
    img[wall] = wall_rgb[None, :] * wall_shade[wall][:, None]
    floor = (t_floor <= t_wall) & np.isfinite(t_floor)
    fx, fy = ox + t_floor * d[:, 0], oy + t_floor * d[:, 1]
    with np.errstate(invalid="ignore"):
        checker = (np.floor(fx / _FLOOR_TILE) + np.floor(fy / _FLOOR_TILE)) % 2
    floor_f = (1.0 - 0.12 * checker) * _shade(t_floor * horiz, 0.06, 0.5)
    img[floor] = np.asarray(layout.floor_rgb, dtype=np.float64)[None, :] * floor_f[floor][:, None]

    depth = np.minimum(np.minimum(t_floor, t_ceil), t_wall)
    for obj in layout.objects:
        t_near, face = _box_hits(obj, ox, oy, oz, d)
        hit = t_near < depth
        if not hit.any():
            continue
        base = np.asarray(PALETTE.get(obj.color, (128, 128, 128)), dtype=np.float64)
        side = _shade(t_near * horiz, 0.03, 0.7)
        fac = np.where(face == 0, 0.72 * side, np.where(face == 1, 0.9 * side, np.minimum(0.9 * side * 1.25, 1.0)))
        img[hit] = base[None, :] * fac[hit][:, None]
        depth = np.where(hit, t_near, depth)
    return np.clip(img.reshape(size, size, 3) + 0.5, 0, 255).astype(np.uint8)


def _box_hits(obj, ox: float, oy: float, oz: float, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry distance along each ray into a box (inf: missed) and the face entered (0 x, 1 y, 2 top)."""
    h = obj.size / 2
    t1, t2 = (obj.x - h - ox) / d[:, 0], (obj.x + h - ox) / d[:, 0]
    t3, t4 = (obj.y - h - oy) / d[:, 1], (obj.y + h - oy) / d[:, 1]
    t5, t6 = (0.0 - oz) / d[:, 2], (obj.height - oz) / d[:, 2]
    lo = np.stack([np.minimum(t1, t2), np.minimum(t3, t4), np.minimum(t5, t6)])
    hi = np.minimum(np.minimum(np.maximum(t1, t2), np.maximum(t3, t4)), np.maximum(t5, t6))
    t_near = lo.max(axis=0)
    hit = (t_near <= hi) & (t_near > 0.05)
    return np.where(hit, t_near, np.inf), lo.argmax(axis=0)


def floor_pixel(layout: Layout, pose: Pose, point: tuple[float, float], size: int, pitch_deg: float,
                hfov_deg: float = 90.0, camera_height: float = 1.25) -> Optional[tuple[float, float]]:
    """``(u, v)`` pixel of the floor point ``point`` in the camera's image, or None when it is behind
    the camera, outside the image, or hidden by a box."""
    forward, right, down = camera_basis(pose, pitch_deg)
    vec = np.array([point[0] - pose.x, point[1] - pose.y, -camera_height])
    z = float(vec @ forward)
    if z <= _EPS:
        return None
    tan_half = math.tan(math.radians(hfov_deg) / 2)
    xn, yn = float(vec @ right) / z / tan_half, float(vec @ down) / z / tan_half
    if abs(xn) >= 1.0 or abs(yn) >= 1.0:
        return None
    d = np.where(np.abs(vec) < _EPS, _EPS, vec)[None, :]  # t = 1 reaches the point
    for obj in layout.objects:
        t_near, _ = _box_hits(obj, pose.x, pose.y, camera_height, d)
        if t_near[0] < 1.0 - 1e-6:
            return None
    return (xn + 1) / 2 * size, (yn + 1) / 2 * size


def pixel_floor_point(pose: Pose, u: float, v: float, size: int, pitch_deg: float, hfov_deg: float = 90.0,
                      camera_height: float = 1.25) -> Optional[tuple[float, float]]:
    """The floor point seen at pixel ``(u, v)`` (continuous pixel coordinates, as :func:`floor_pixel`
    gives them), or None when that pixel's ray does not reach the floor (at or above the horizon)."""
    forward, right, down = camera_basis(pose, pitch_deg)
    tan_half = math.tan(math.radians(hfov_deg) / 2)
    ray = forward + (u / size * 2 - 1) * tan_half * right + (v / size * 2 - 1) * tan_half * down
    if ray[2] >= -_EPS:
        return None
    t = camera_height / -ray[2]
    return pose.x + t * float(ray[0]), pose.y + t * float(ray[1])


def pixel_goal(layout: Layout, poses: list[Pose], s: int, size: int, pitch_deg: float,
               hfov_deg: float = 90.0, camera_height: float = 1.25) -> tuple[int, tuple[float, float]]:
    """The pixel goal of frame ``s`` of a trajectory, the way InternData-N1 chooses it: the farthest
    later position whose floor point the look-down camera at ``poses[s]`` sees, along the stretch of
    the path that stays in view once it has come into view. Returns (relative goal frame id, (u, v)):
    ``(-1, (-1, -1))`` when no later position is visible (e.g. while turning in place)."""
    best = (-1, (-1.0, -1.0))
    seen = False
    for k in range(s + 1, len(poses)):
        px = floor_pixel(layout, poses[s], (poses[k].x, poses[k].y), size, pitch_deg, hfov_deg, camera_height)
        if px is None:
            if seen:
                break
            continue
        seen = True
        best = (k - s, px)
    return best

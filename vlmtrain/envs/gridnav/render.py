"""Egocentric pinhole renderer for GridNav, vectorised over columns and pixels with numpy.

Camera: at (pose.x, pose.y, camera_height), looking along the heading with zero pitch, square
pixels, horizontal field of view ``hfov_deg`` (the vertical one equals it on the square image).
Walls are ``WALL_HEIGHT`` tall with a flat ceiling on top; the floor has a faint 0.5 m checker so
forward motion is visible; boxes are square prisms with shaded faces, occluded by per-pixel depth.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image

from .world import PALETTE, Layout, Pose

WALL_HEIGHT = 2.5
CEILING_RGB = np.array([205.0, 205.0, 212.0])
# Each wall orientation gets its own brightness so that turning is perceivable (+x, -x, +y, -y).
_WALL_TONE = np.array([1.0, 0.80, 0.90, 0.70])
_FLOOR_TILE = 0.5
_MIN_HIT = 0.05  # boxes nearer than this are skipped (agent inside the box)


@lru_cache(maxsize=16)
def _camera(size: int, hfov_deg: float) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Focal length, per-column angle offsets and cosines, per-row vertical offsets (cached)."""
    tan_half = math.tan(math.radians(hfov_deg) / 2)
    focal = (size / 2) / tan_half
    # Column 0 is the left edge, i.e. a positive angle (LEFT turns increase heading).
    offs = np.arctan((1.0 - 2.0 * (np.arange(size) + 0.5) / size) * tan_half)
    rows = np.arange(size) + 0.5 - size / 2  # positive = below the horizon
    for a in (offs, rows):
        a.setflags(write=False)
    cos_offs = np.cos(offs)
    cos_offs.setflags(write=False)
    return focal, offs, cos_offs, rows


def _shade(t: np.ndarray, k: float, lo: float) -> np.ndarray:
    """Distance shading: farther is darker, floored at ``lo`` so colours survive."""
    return np.clip(1.0 - k * t, lo, 1.0)


def render(layout: Layout, pose: Pose, size: int = 64, hfov_deg: float = 90.0,
           camera_height: float = 1.25) -> np.ndarray:
    """Render the agent's view as a (size, size, 3) uint8 RGB image."""
    focal, offs, cos_a, rows = _camera(size, float(hfov_deg))
    ang = pose.heading + offs
    dx = np.cos(ang)
    dy = np.sin(ang)
    # Exact zeros would give 0 * inf = nan in the slab tests below.
    dx = np.where(dx == 0.0, 1e-12, dx)
    dy = np.where(dy == 0.0, 1e-12, dy)
    inv_dx = 1.0 / dx
    inv_dy = 1.0 / dy

    # --- walls: distance along each ray to the room boundary ---
    tx = np.where(dx > 0, (layout.width - pose.x) * inv_dx, -pose.x * inv_dx)
    ty = np.where(dy > 0, (layout.depth - pose.y) * inv_dy, -pose.y * inv_dy)
    hit_x = tx < ty
    wall_t = np.maximum(np.where(hit_x, tx, ty), 1e-6)
    wall_id = np.where(hit_x, np.where(dx > 0, 0, 1), np.where(dy > 0, 2, 3))
    wall_z = wall_t * cos_a
    wall_col = (np.asarray(layout.wall_rgb, dtype=np.float64)[None, :]
                * (_WALL_TONE[wall_id] * _shade(wall_t, 0.05, 0.55))[:, None])  # (W, 3)

    # --- per pixel: ceiling / wall / floor by comparing the row with the wall's screen extent ---
    r = rows[:, None]
    ceil_mask = r < -focal * (WALL_HEIGHT - camera_height) / wall_z[None, :]
    floor_mask = r > focal * camera_height / wall_z[None, :]
    img = np.broadcast_to(wall_col[None, :, :], (size, size, 3)).copy()
    img[ceil_mask] = CEILING_RGB

    # Floor: intersect each below-horizon pixel ray with the floor plane for a checker texture.
    half = size // 2
    fr = rows[half:]  # all > 0
    t_floor = (focal * camera_height / fr)[:, None] / cos_a[None, :]
    fx = pose.x + t_floor * dx[None, :]
    fy = pose.y + t_floor * dy[None, :]
    checker = (np.floor(fx / _FLOOR_TILE) + np.floor(fy / _FLOOR_TILE)) % 2
    floor_f = (1.0 - 0.12 * checker) * _shade(t_floor, 0.06, 0.5)
    floor_img = np.asarray(layout.floor_rgb, dtype=np.float64)[None, None, :] * floor_f[..., None]
    fm = floor_mask[half:]
    img[half:][fm] = floor_img[fm]

    # --- boxes: 2-D slab test per column, then per-pixel nearest-depth compositing ---
    zbuf = np.full((size, size), np.inf)
    for obj in layout.objects:
        h = obj.size / 2
        t1 = (obj.x - h - pose.x) * inv_dx
        t2 = (obj.x + h - pose.x) * inv_dx
        t3 = (obj.y - h - pose.y) * inv_dy
        t4 = (obj.y + h - pose.y) * inv_dy
        txmin, txmax = np.minimum(t1, t2), np.maximum(t1, t2)
        tymin, tymax = np.minimum(t3, t4), np.maximum(t3, t4)
        t_near = np.maximum(txmin, tymin)
        t_far = np.minimum(txmax, tymax)
        hit = (t_near <= t_far) & (t_near >= _MIN_HIT)
        if not hit.any():
            continue
        t_near = np.where(hit, t_near, np.inf)
        z_near = np.where(hit, t_near * cos_a, 1.0)
        z_far = np.where(hit, t_far * cos_a, 1.0)
        dz = camera_height - obj.height
        top_near = focal * dz / z_near  # screen row of the front top edge
        top_far = focal * dz / z_far  # screen row of the back top edge
        bottom = focal * camera_height / z_near
        top = np.minimum(top_near, top_far)
        mask = (hit[None, :] & (r >= top[None, :]) & (r < bottom[None, :])
                & (t_near[None, :] < zbuf))
        if not mask.any():
            continue
        base = np.asarray(PALETTE.get(obj.color, (128, 128, 128)), dtype=np.float64)
        # Face shading makes boxes look 3-D: x-faces darker than y-faces, the top brightest.
        side_f = np.where(txmin > tymin, 0.72, 0.9) * _shade(t_near, 0.03, 0.7)
        top_f = np.minimum(side_f * 1.25, 1.0)
        is_top = (r < top_near[None, :]) if dz > 0 else np.zeros_like(mask)
        fac = np.where(is_top, top_f[None, :], side_f[None, :])
        img[mask] = base[None, :] * fac[mask][:, None]
        zbuf = np.where(mask, t_near[None, :], zbuf)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB uint8 image as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="JPEG",
                                                                    quality=quality)
    return buf.getvalue()


def decode_jpeg(b: bytes) -> np.ndarray:
    """Decode JPEG bytes to an RGB uint8 array."""
    with Image.open(io.BytesIO(b)) as im:
        return np.asarray(im.convert("RGB"))


def observe(layout: Layout, pose: Pose, size: int = 64, quality: int = 90,
            camera_height: float = 1.25) -> np.ndarray:
    """Render, JPEG-encode and decode: exactly what a written dataset frame holds."""
    return decode_jpeg(encode_jpeg(render(layout, pose, size, camera_height=camera_height),
                                   quality))

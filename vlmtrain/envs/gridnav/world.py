"""GridNav world: rooms with coloured boxes, poses, episode specs and seeds, the motion model.

Coordinates: the floor is the x/y plane (metres), walls at x=0, x=width, y=0, y=depth; heading is in
radians, 0 = +x, LEFT turns increase it. Headings are kept on exact multiples of 15 degrees.

Held-out layouts: every episode draws from its own random stream seeded with
``(seed, split_id, index)`` (a numpy ``SeedSequence`` entropy list). "train", "val" and "test" have
distinct split ids, so the three splits never share a stream; layouts are continuous random draws,
so a layout of one split does not reappear in another
(``tests/envs/gridnav/test_world.py`` checks it). ``make_episode`` lives in ``expert`` because it
rejects starts whose expert path is too long; this module imports nothing from the package.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

STOP, FORWARD, LEFT, RIGHT = 0, 1, 2, 3
ACTION_NAMES: dict[int, str] = {STOP: "STOP", FORWARD: "FORWARD", LEFT: "LEFT", RIGHT: "RIGHT"}
FORWARD_M = 0.25
TURN_RAD = math.radians(15)
SUCCESS_RADIUS = 0.75
MAX_STEPS = 60
STOP_RADIUS = 0.6  # the expert stops within this distance of the goal centre (< SUCCESS_RADIUS)

WALL_CLEARANCE = 0.2  # FORWARD is refused (a collision) if it would end closer than this to a wall
BOX_SIZE = 0.5
BOX_HEIGHT = 1.0  # tall enough to stay visible from a 1.25 m camera when close
NUM_BOXES = 4
ROOM_MIN, ROOM_MAX = 5.0, 7.0
BOX_MIN_SEPARATION = 1.2
BOX_WALL_MARGIN = 0.6  # from the box's side to the wall
START_GOAL_MIN = 1.5
START_BOX_MIN = 0.5  # from the box's footprint
START_WALL_MIN = 0.4
# The noise-free expert must finish (STOP included) within this many actions, leaving a policy
# 10 steps of slack under MAX_STEPS; rejects ~0.6 % of sampled starts (long searches + long walks).
MAX_REFERENCE_ACTIONS = MAX_STEPS - 10

# Saturated, mutually distant colours: they stay distinguishable after JPEG at 32 px and under
# the renderer's face/distance shading, and are far from the grey/beige walls and floor.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 230),
    "yellow": (235, 215, 30),
    "purple": (150, 30, 190),
    "cyan": (30, 210, 220),
}

INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "walk to the {c} box and stop",
    "go to the {c} box",
    "find the {c} box and stop next to it",
    "navigate to the {c} box",
    "head over to the {c} box and wait there",
    "move toward the {c} box and stop",
    "go find the {c} box",
    "stop when you reach the {c} box",
)

SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
HEADING_STEPS = 24  # 360 / 15


def split_id(split: str) -> int:
    """Numeric id of a split for seeding; unknown names get a stable CRC-derived id (>= 3)."""
    if split in SPLIT_IDS:
        return SPLIT_IDS[split]
    # Offset keeps custom splits away from the three standard streams.
    return 3 + zlib.crc32(split.encode("utf-8"))


def episode_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """Deterministic generator for one episode; ``stream`` 0 = layout, 1 = demo noise."""
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    return np.random.default_rng([seed, split_id(split), index, stream])


@dataclass(frozen=True)
class GridObject:
    """An axis-aligned square box standing on the floor, centred at (x, y)."""

    x: float
    y: float
    size: float
    height: float
    color: str
    kind: str = "box"


@dataclass(frozen=True)
class Layout:
    """A rectangular room [0, width] x [0, depth] with its objects and surface colours."""

    width: float
    depth: float
    objects: tuple[GridObject, ...]
    wall_rgb: tuple[int, int, int]
    floor_rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Pose:
    """Agent position on the floor (metres) and heading (radians, 0 = +x, counter-clockwise)."""

    x: float
    y: float
    heading: float


@dataclass(frozen=True)
class EpisodeSpec:
    """Everything needed to replay one episode; ``goal`` indexes ``layout.objects``."""

    split: str
    index: int
    seed: int
    layout: Layout
    start: Pose
    goal: int
    instruction: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_json`` of it gives back an equal spec."""
        lay = self.layout
        return {
            "split": self.split,
            "index": self.index,
            "seed": self.seed,
            "layout": {
                "width": lay.width,
                "depth": lay.depth,
                "objects": [
                    {"x": o.x, "y": o.y, "size": o.size, "height": o.height, "color": o.color,
                     "kind": o.kind}
                    for o in lay.objects
                ],
                "wall_rgb": list(lay.wall_rgb),
                "floor_rgb": list(lay.floor_rgb),
            },
            "start": {"x": self.start.x, "y": self.start.y, "heading": self.start.heading},
            "goal": self.goal,
            "instruction": self.instruction,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "EpisodeSpec":
        """Inverse of ``to_json`` (Python's JSON float repr round-trips exactly)."""
        lay = d["layout"]
        layout = Layout(
            width=float(lay["width"]),
            depth=float(lay["depth"]),
            objects=tuple(
                GridObject(float(o["x"]), float(o["y"]), float(o["size"]), float(o["height"]),
                           str(o["color"]), str(o.get("kind", "box")))
                for o in lay["objects"]
            ),
            wall_rgb=tuple(int(v) for v in lay["wall_rgb"]),  # type: ignore[arg-type]
            floor_rgb=tuple(int(v) for v in lay["floor_rgb"]),  # type: ignore[arg-type]
        )
        s = d["start"]
        return EpisodeSpec(
            split=str(d["split"]),
            index=int(d["index"]),
            seed=int(d["seed"]),
            layout=layout,
            start=Pose(float(s["x"]), float(s["y"]), float(s["heading"])),
            goal=int(d["goal"]),
            instruction=str(d["instruction"]),
        )

    @property
    def goal_object(self) -> GridObject:
        """The goal box."""
        return self.layout.objects[self.goal]


def heading_from_steps(k: int) -> float:
    """Heading of ``k`` 15-degree steps wrapped to (-pi, pi]; exact, so turns never drift."""
    k = k % HEADING_STEPS
    if k > HEADING_STEPS // 2:
        k -= HEADING_STEPS
    return k * TURN_RAD


def heading_steps(heading: float) -> int:
    """Nearest number of 15-degree steps of a heading."""
    return int(round(heading / TURN_RAD))


def wrap_angle(a: float) -> float:
    """Wrap an angle to (-pi, pi]."""
    a = math.remainder(a, 2 * math.pi)  # [-pi, pi]
    return math.pi if a <= -math.pi else a


def footprint_distance(obj: GridObject, x: float, y: float) -> float:
    """Euclidean distance from (x, y) to the box's square footprint (0 inside it)."""
    h = obj.size / 2
    dx = max(abs(x - obj.x) - h, 0.0)
    dy = max(abs(y - obj.y) - h, 0.0)
    return math.hypot(dx, dy)


def sample_layout(rng: np.random.Generator) -> Layout:
    """A random room with ``NUM_BOXES`` boxes of distinct palette colours and neutral surfaces
    (the first draws of an episode's layout stream, see ``expert.make_episode``)."""
    width = float(rng.uniform(ROOM_MIN, ROOM_MAX))
    depth = float(rng.uniform(ROOM_MIN, ROOM_MAX))
    names = list(PALETTE)
    colours = [names[i] for i in rng.permutation(len(names))[:NUM_BOXES]]
    lo = BOX_WALL_MARGIN + BOX_SIZE / 2
    centres: list[tuple[float, float]] = []
    # Rejection sampling: in a >= 5 m room four points 1.2 m apart are easy to find; restart the
    # whole placement if a box gets boxed in (never observed, but keeps this total).
    while len(centres) < NUM_BOXES:
        for _ in range(200):
            x = float(rng.uniform(lo, width - lo))
            y = float(rng.uniform(lo, depth - lo))
            if all(math.hypot(x - cx, y - cy) >= BOX_MIN_SEPARATION for cx, cy in centres):
                centres.append((x, y))
                break
        else:
            centres = []
    objects = tuple(
        GridObject(x, y, BOX_SIZE, BOX_HEIGHT, c) for (x, y), c in zip(centres, colours)
    )
    # Neutral, desaturated surfaces so the palette colours stand out.
    g = int(rng.integers(150, 190))
    wall = (g + int(rng.integers(0, 15)), g + int(rng.integers(0, 10)), g)
    f = int(rng.integers(85, 115))
    floor = (f + int(rng.integers(0, 12)), f + int(rng.integers(0, 8)), f)
    return Layout(width, depth, objects, wall, floor)


def step(layout: Layout, pose: Pose, action: int) -> Pose:
    """Apply one action. FORWARD that would end within 0.2 m of a wall is a collision (no move)."""
    if action == FORWARD:
        x = pose.x + FORWARD_M * math.cos(pose.heading)
        y = pose.y + FORWARD_M * math.sin(pose.heading)
        c = WALL_CLEARANCE
        if c <= x <= layout.width - c and c <= y <= layout.depth - c:
            return Pose(x, y, pose.heading)
        return pose
    if action == LEFT:
        return Pose(pose.x, pose.y, heading_from_steps(heading_steps(pose.heading) + 1))
    if action == RIGHT:
        return Pose(pose.x, pose.y, heading_from_steps(heading_steps(pose.heading) - 1))
    if action == STOP:
        return pose
    raise ValueError(f"unknown action {action!r}")


def goal_distance(spec: EpisodeSpec, pose: Pose) -> float:
    """Euclidean distance from the agent to the goal box centre."""
    g = spec.goal_object
    return math.hypot(g.x - pose.x, g.y - pose.y)


def goal_bearing(spec: EpisodeSpec, pose: Pose) -> float:
    """Angle from the agent's heading to the goal centre, in (-pi, pi]; positive = to the left."""
    g = spec.goal_object
    return wrap_angle(math.atan2(g.y - pose.y, g.x - pose.x) - pose.heading)

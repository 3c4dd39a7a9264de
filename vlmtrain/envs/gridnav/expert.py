"""The GridNav expert ("shortest-path planner") and noisy DAgger-like demonstrations.

Boxes do not block movement, so the shortest path to the goal is the straight line. The expert
follows it with decisions a policy can infer from the frames: turn toward the goal when it is in
view, go forward when it is roughly ahead, STOP within ``STOP_RADIUS``; when the goal is out of
view, always turn LEFT (a fixed search direction needs no hidden state).

``make_episode`` (episode sampling) lives here, not in ``world``, because it keeps only starts the
expert can finish within ``MAX_REFERENCE_ACTIONS``; imports go one way, expert -> world.
"""

from __future__ import annotations

import math
from dataclasses import replace, dataclass, field

import numpy as np

from .world import (FORWARD, FORWARD_M, HEADING_STEPS, INSTRUCTION_TEMPLATES, LEFT,
                    MAX_REFERENCE_ACTIONS, NUM_BOXES, RIGHT, START_BOX_MIN, START_GOAL_MIN,
                    START_WALL_MIN, STOP, STOP_RADIUS, EpisodeSpec, Pose, episode_rng,
                    footprint_distance, goal_bearing, goal_distance, heading_from_steps,
                    sample_layout, step)

# FORWARD while the goal is within +-22.5 deg (a turn and a half). A half-turn window (7.5 deg, the
# first version) asks a policy to read the goal's bearing to a few degrees from 32 px frames; one
# that misjudges it by 5 deg turns left and right forever (docs/gridnav.md has the numbers).
AHEAD_RAD = math.radians(22.5) + 1e-6
EXPERT_VERSION = 2  # bumped whenever expert_action decides differently (generated data records it)
IN_VIEW_RAD = math.radians(45.0 - 3.0)  # hfov 90 deg with a margin so the goal is visibly in view


def expert_action(spec: EpisodeSpec, pose: Pose) -> int:
    """The expert's action at ``pose`` (see module doc). Never oscillates: turns toward an in-view
    goal keep it in view, never carry it across the heading, and end with |bearing| <= 22.5 deg;
    the search always turns LEFT."""
    if goal_distance(spec, pose) <= STOP_RADIUS:
        return STOP
    b = goal_bearing(spec, pose)
    if abs(b) <= AHEAD_RAD:
        return FORWARD
    if abs(b) < IN_VIEW_RAD:
        return LEFT if b > 0 else RIGHT
    return LEFT


@dataclass
class Demo:
    """A demonstration: pose at each frame, action executed at that frame (last = STOP), and the
    expert label at that frame (differs from ``executed`` where noise was injected)."""

    poses: list[Pose] = field(default_factory=list)
    executed: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.poses)


def demonstrate(spec: EpisodeSpec, rng: np.random.Generator, noise_p: float = 0.25,
                max_frames: int = 100, detour_p: float = 0.0) -> Demo:
    """Noisy demonstration (DAgger-like): the label is always the expert action toward the goal.

    With probability ``noise_p`` a uniformly random non-STOP action is executed instead, so a policy
    learns to recover from small mistakes. With probability ``detour_p`` per episode the demo first
    *executes* the expert toward a random distractor box until it would stop there, then goes on
    toward the goal: the frames near and facing distractors, labelled with the true expert's
    actions, are what teaches colour grounding (without them "a box is close -> STOP" fits the data).
    Ends when STOP is executed; at ``max_frames`` the last frame executes STOP (label kept)."""
    demo = Demo()
    pose = spec.start
    detour = None
    if detour_p > 0 and rng.random() < detour_p:
        others = [i for i in range(len(spec.layout.objects)) if i != spec.goal]
        detour = replace(spec, goal=int(rng.choice(others)))
    for t in range(max_frames):
        label = expert_action(spec, pose)
        action = label
        if detour is not None:
            action = expert_action(detour, pose)
            if action == STOP:  # reached the distractor: the detour is over
                detour, action = None, label
        if noise_p > 0 and rng.random() < noise_p:
            action = int(rng.integers(FORWARD, RIGHT + 1))
        if t == max_frames - 1:
            action = STOP  # truncated: the demo still ends with STOP
        demo.poses.append(pose)
        demo.executed.append(action)
        demo.labels.append(label)
        if action == STOP:
            break
        pose = step(spec.layout, pose, action)
    return demo


def reference_path(spec: EpisodeSpec, max_frames: int = 500) -> list[Pose]:
    """The noise-free expert rollout, start pose to the pose where it STOPs (inclusive); raises
    RuntimeError on a wall collision or if it needs more than ``max_frames`` frames."""
    poses = [spec.start]
    pose = spec.start
    for _ in range(max_frames):
        a = expert_action(spec, pose)
        if a == STOP:
            return poses
        nxt = step(spec.layout, pose, a)
        if nxt == pose:
            raise RuntimeError(f"expert collided with a wall in episode {spec.split}/{spec.index}")
        pose = nxt
        poses.append(pose)
    raise RuntimeError(f"expert did not stop within {max_frames} steps ({spec.split}/{spec.index})")


def path_length(poses: list[Pose]) -> float:
    """Travelled distance along consecutive poses."""
    return sum(math.hypot(b.x - a.x, b.y - a.y) for a, b in zip(poses, poses[1:]))


def reference_length(spec: EpisodeSpec) -> float:
    """Shortest length for SPL: FORWARD_M times the number of FORWARD moves of the reference."""
    poses = reference_path(spec)
    moves = sum(1 for a, b in zip(poses, poses[1:]) if (a.x, a.y) != (b.x, b.y))
    return FORWARD_M * moves


def make_episode(seed: int, split: str, index: int) -> EpisodeSpec:
    """Sample episode ``index`` of ``split`` deterministically from ``seed`` (see ``world``'s module
    doc); starts whose noise-free expert needs more than ``MAX_REFERENCE_ACTIONS`` are resampled."""
    rng = episode_rng(seed, split, index)
    while True:
        layout = sample_layout(rng)
        goal = int(rng.integers(NUM_BOXES))
        g = layout.objects[goal]
        for _ in range(500):
            x = float(rng.uniform(START_WALL_MIN, layout.width - START_WALL_MIN))
            y = float(rng.uniform(START_WALL_MIN, layout.depth - START_WALL_MIN))
            if math.hypot(x - g.x, y - g.y) < START_GOAL_MIN:
                continue
            if any(footprint_distance(o, x, y) < START_BOX_MIN for o in layout.objects):
                continue
            heading = heading_from_steps(int(rng.integers(HEADING_STEPS)))
            template = INSTRUCTION_TEMPLATES[int(rng.integers(len(INSTRUCTION_TEMPLATES)))]
            spec = EpisodeSpec(split, index, seed, layout, Pose(x, y, heading), goal,
                               template.format(c=g.color))
            try:  # len(reference poses) == number of expert actions, STOP included
                reference_path(spec, max_frames=MAX_REFERENCE_ACTIONS)
            except RuntimeError:
                continue  # too long (or, never observed, a wall collision): resample the start
            return spec

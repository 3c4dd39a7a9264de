"""Closed-loop evaluation: roll a policy through GridNav episodes in lockstep.

A policy is any callable taking the still-active episode states and returning one action each,
so a neural policy can batch all active episodes into one forward pass per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .expert import expert_action, reference_path
from .metrics import EpisodeResult, dedup, ndtw
from .render import observe
from .world import (FORWARD, FORWARD_M, MAX_STEPS, STOP, SUCCESS_RADIUS, EpisodeSpec, Pose,
                    goal_distance, step)


@dataclass
class EpisodeState:
    """What a policy sees of one running episode (frames come from ``observe``, last = current)."""

    spec: EpisodeSpec
    pose: Pose
    t: int = 0
    frames: list[np.ndarray] = field(default_factory=list)
    positions: list[tuple[float, float]] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    done: bool = False
    stopped: bool = False


Policy = Callable[[list[EpisodeState]], list[int]]


def _result(state: EpisodeState) -> EpisodeResult:
    spec = state.spec
    g = spec.goal_object
    final = goal_distance(spec, state.pose)
    success = state.stopped and final <= SUCCESS_RADIUS
    oracle = any(math.hypot(x - g.x, y - g.y) <= SUCCESS_RADIUS for x, y in state.positions)
    ref = reference_path(spec)
    ref_pts = dedup([(p.x, p.y) for p in ref])
    ref_len = FORWARD_M * (len(ref_pts) - 1)
    path_len = sum(math.hypot(b[0] - a[0], b[1] - a[1])
                   for a, b in zip(state.positions, state.positions[1:]))
    if success:
        outcome = "success"
    elif not state.stopped:
        outcome = "out_of_steps"
    elif any(math.hypot(o.x - state.pose.x, o.y - state.pose.y) <= SUCCESS_RADIUS
             for i, o in enumerate(spec.layout.objects) if i != spec.goal):
        outcome = "stopped_at_distractor"
    else:
        outcome = "stopped_elsewhere"
    spl = float(success) * ref_len / max(path_len, ref_len) if max(path_len, ref_len) > 0 else 0.0
    return EpisodeResult(
        index=spec.index, success=success, oracle_success=oracle, nav_error=final,
        path_length=path_len, reference_length=ref_len, spl=spl,
        ndtw=ndtw(dedup(state.positions), ref_pts), steps=state.t, outcome=outcome,
        actions=list(state.actions),
    )


def rollout(specs: Sequence[EpisodeSpec], policy: Policy, max_steps: int = MAX_STEPS,
            image_size: int = 64) -> list[EpisodeResult]:
    """Run all episodes in lockstep, one ``policy`` call per step on the active states; an
    episode ends at STOP or after ``max_steps`` actions. Results are in the order of ``specs``."""
    states = [
        EpisodeState(spec=s, pose=s.start, frames=[observe(s.layout, s.start, image_size)],
                     positions=[(s.start.x, s.start.y)])
        for s in specs
    ]
    while True:
        active = [s for s in states if not s.done]
        if not active:
            break
        actions = policy(active)
        if len(actions) != len(active):
            raise ValueError(f"policy returned {len(actions)} actions for {len(active)} states")
        for st, a in zip(active, actions):
            a = int(a)
            st.actions.append(a)
            st.t += 1
            if a == STOP:
                st.stopped = st.done = True
                continue
            st.pose = step(st.spec.layout, st.pose, a)
            st.positions.append((st.pose.x, st.pose.y))
            if st.t >= max_steps:
                st.done = True  # no frame needed after the last action
            else:
                st.frames.append(observe(st.spec.layout, st.pose, image_size))
    return [_result(s) for s in states]


def random_policy(seed: int) -> Policy:
    """Baseline: uniform over the four actions."""
    rng = np.random.default_rng(seed)

    def policy(states: list[EpisodeState]) -> list[int]:
        return [int(a) for a in rng.integers(0, 4, size=len(states))]

    return policy


def forward_policy() -> Policy:
    """Baseline: FORWARD until a FORWARD does not move the agent (a wall), then STOP."""

    def policy(states: list[EpisodeState]) -> list[int]:
        out = []
        for s in states:
            blocked = bool(s.actions) and s.actions[-1] == FORWARD and \
                len(s.positions) >= 2 and s.positions[-1] == s.positions[-2]
            out.append(STOP if blocked else FORWARD)
        return out

    return policy


def expert_policy() -> Policy:
    """The noise-free expert as a policy (an upper bound; uses privileged state)."""

    def policy(states: list[EpisodeState]) -> list[int]:
        return [expert_action(s.spec, s.pose) for s in states]

    return policy

"""GridNav expert, demonstrations, closed-loop rollout and metrics."""

import math

import numpy as np
import pytest

from vlmtrain.data.gridnav import (FORWARD, LEFT, MAX_STEPS, RIGHT, STOP, STOP_RADIUS,
                                   EpisodeState, Pose, demonstrate, episode_rng, expert_action,
                                   forward_policy, goal_distance, make_episode,
                                   ndtw, random_policy, reference_path, rollout, step, summarize)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_reference_path_reaches_goal(split: str) -> None:
    for i in range(200):
        spec = make_episode(0, split, i)
        poses = reference_path(spec)  # raises on a wall collision or a runaway loop
        assert goal_distance(spec, poses[-1]) <= STOP_RADIUS
        assert expert_action(spec, poses[-1]) == STOP
        assert len(poses) <= MAX_STEPS - 10  # actions incl. STOP: slack under the step cap
        acts = [expert_action(spec, p) for p in poses[:-1]]
        assert STOP not in acts
        # No oscillation: never a LEFT directly followed by a RIGHT or vice versa.
        for a, b in zip(acts, acts[1:]):
            assert {a, b} != {LEFT, RIGHT}
        # Every FORWARD moves (no wall collisions).
        for p, a, q in zip(poses, acts, poses[1:]):
            assert q == step(spec.layout, p, a) and q != p


def test_expert_turn_rules() -> None:
    spec = make_episode(0, "train", 0)
    g = spec.goal_object
    far = Pose(g.x - 2.0, g.y, 0.0)
    assert expert_action(spec, far) == FORWARD
    assert expert_action(spec, Pose(far.x, far.y, math.radians(-30))) == LEFT
    assert expert_action(spec, Pose(far.x, far.y, math.radians(30))) == RIGHT
    # Out of view on either side: always search LEFT.
    assert expert_action(spec, Pose(far.x, far.y, math.radians(90))) == LEFT
    assert expert_action(spec, Pose(far.x, far.y, math.radians(-90))) == LEFT
    assert expert_action(spec, Pose(g.x - 0.5, g.y, math.pi)) == STOP


def test_noisy_demo_labels_are_expert_actions() -> None:
    lengths = []
    noisy = 0
    for i in range(50):
        spec = make_episode(2, "train", i)
        demo = demonstrate(spec, episode_rng(2, "train", i, 1), noise_p=0.25)
        lengths.append(len(demo))
        assert len(demo.poses) == len(demo.executed) == len(demo.labels)
        assert demo.poses[0] == spec.start and demo.executed[-1] == STOP
        assert STOP not in demo.executed[:-1]
        for t, p in enumerate(demo.poses):
            assert demo.labels[t] == expert_action(spec, p)
            if t + 1 < len(demo):
                assert demo.poses[t + 1] == step(spec.layout, p, demo.executed[t])
        noisy += sum(a != b for a, b in zip(demo.executed, demo.labels))
    assert noisy > 0
    # Determinism by rng.
    spec = make_episode(2, "train", 0)
    a = demonstrate(spec, np.random.default_rng(5))
    b = demonstrate(spec, np.random.default_rng(5))
    assert a == b
    # Noise-free demo == reference path.
    clean = demonstrate(spec, np.random.default_rng(0), noise_p=0.0)
    assert clean.poses == reference_path(spec) and clean.executed == clean.labels


def test_ndtw() -> None:
    ref = [(0.0, 0.0), (0.25, 0.0), (0.5, 0.0), (0.75, 0.0)]
    assert ndtw(ref, ref) == pytest.approx(1.0)
    scores = [ndtw([(x, y + off) for x, y in ref], ref) for off in (0.1, 0.3, 0.6, 1.2)]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert 0.0 < scores[-1] < 1.0


def test_rollout_expert_replay_succeeds() -> None:
    specs = [make_episode(0, "test", i) for i in range(30)]
    calls: list[int] = []

    def policy(states: list[EpisodeState]) -> list[int]:
        calls.append(len(states))
        for s in states:
            assert s.frames[-1].shape == (32, 32, 3) and len(s.frames) == s.t + 1
        return [expert_action(s.spec, s.pose) for s in states]

    results = rollout(specs, policy, image_size=32)
    summary = summarize(results)
    assert summary["sr"] == 1.0 and summary["spl"] == 1.0 and summary["ndtw"] == 1.0
    assert summary["outcomes"]["success"] == 1.0
    assert calls[0] == 30 and max(calls) == 30  # lockstep batches of the active episodes
    assert [r.index for r in results] == list(range(30))
    assert all(r.actions[-1] == STOP for r in results)


def test_rollout_out_of_steps() -> None:
    specs = [make_episode(0, "test", i) for i in range(3)]
    results = rollout(specs, lambda st: [LEFT] * len(st), max_steps=5, image_size=16)
    assert all(r.outcome == "out_of_steps" and r.steps == 5 and not r.success for r in results)


def test_baselines_fail() -> None:
    specs = [make_episode(0, "test", i) for i in range(100)]
    for policy in (random_policy(0), forward_policy()):
        summary = summarize(rollout(specs, policy, image_size=16))
        assert summary["sr"] <= 0.15
        assert summary["episodes"] == 100
        assert abs(sum(summary["outcomes"].values()) - 1.0) < 1e-3
    fwd = rollout(specs[:5], forward_policy(), image_size=16)
    assert all(r.actions[-1] == STOP and set(r.actions[:-1]) <= {FORWARD} for r in fwd)

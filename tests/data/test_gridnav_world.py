"""GridNav world: determinism, held-out splits, motion model."""

import math

from vlmtrain.data.gridnav import (FORWARD, FORWARD_M, LEFT, RIGHT, STOP, TURN_RAD, EpisodeSpec,
                                   Pose, goal_distance, make_episode, step)
from vlmtrain.data.gridnav.world import footprint_distance


def test_make_episode_deterministic() -> None:
    assert make_episode(3, "train", 7) == make_episode(3, "train", 7)
    assert make_episode(3, "train", 7) != make_episode(3, "train", 8)
    assert make_episode(3, "train", 7).layout != make_episode(4, "train", 7).layout


def test_episode_constraints() -> None:
    for split in ("train", "val", "test"):
        for i in range(100):
            s = make_episode(0, split, i)
            lay = s.layout
            assert 5 <= lay.width <= 7 and 5 <= lay.depth <= 7
            objs = lay.objects
            assert len(objs) == 4 and len({o.color for o in objs}) == 4
            for a in range(4):
                o = objs[a]
                assert o.x - o.size / 2 >= 0.6 - 1e-9 and lay.width - o.x - o.size / 2 >= 0.6 - 1e-9
                assert o.y - o.size / 2 >= 0.6 - 1e-9 and lay.depth - o.y - o.size / 2 >= 0.6 - 1e-9
                for b in range(a):
                    assert math.hypot(o.x - objs[b].x, o.y - objs[b].y) >= 1.2
            st = s.start
            assert goal_distance(s, st) >= 1.5
            assert all(footprint_distance(o, st.x, st.y) >= 0.5 for o in objs)
            assert min(st.x, st.y, lay.width - st.x, lay.depth - st.y) >= 0.4
            k = st.heading / TURN_RAD
            assert abs(k - round(k)) < 1e-9
            assert objs[s.goal].color in s.instruction


def test_instruction_variety() -> None:
    templates = {make_episode(0, "train", i).instruction.replace(
        make_episode(0, "train", i).goal_object.color, "C") for i in range(200)}
    assert len(templates) >= 6


def test_json_round_trip() -> None:
    s = make_episode(11, "val", 5)
    assert EpisodeSpec.from_json(s.to_json()) == s
    import json
    assert EpisodeSpec.from_json(json.loads(json.dumps(s.to_json()))) == s


def test_split_layouts_disjoint() -> None:
    layouts = {split: {make_episode(0, split, i).layout for i in range(200)}
               for split in ("train", "val", "test")}
    assert not layouts["train"] & layouts["val"]
    assert not layouts["train"] & layouts["test"]
    assert not layouts["val"] & layouts["test"]
    assert len(layouts["train"]) == 200


def test_step_forward_and_wall_collision() -> None:
    lay = make_episode(0, "train", 0).layout
    p = Pose(1.0, 1.0, 0.0)
    q = step(lay, p, FORWARD)
    assert math.isclose(q.x, 1.0 + FORWARD_M) and math.isclose(q.y, 1.0) and q.heading == 0.0
    # Facing -x at 0.4 m from the wall: 0.15 m would be too close (< 0.2), so no move.
    near = Pose(0.4, 1.0, math.pi)
    assert step(lay, near, FORWARD) == near
    ok = Pose(0.5, 1.0, math.pi)
    assert math.isclose(step(lay, ok, FORWARD).x, 0.25)
    assert step(lay, p, STOP) == p


def test_turn_arithmetic() -> None:
    lay = make_episode(0, "train", 0).layout
    p = Pose(2.0, 2.0, 0.0)
    left = step(lay, p, LEFT)
    assert math.isclose(left.heading, TURN_RAD) and (left.x, left.y) == (p.x, p.y)
    assert math.isclose(step(lay, p, RIGHT).heading, -TURN_RAD)
    assert step(lay, left, RIGHT) == p
    q = p
    for _ in range(24):
        q = step(lay, q, LEFT)
    assert q == p  # exact: headings stay on multiples of 15 degrees
    for _ in range(12):
        q = step(lay, q, RIGHT)
    assert math.isclose(abs(q.heading), math.pi)
    assert -math.pi < q.heading <= math.pi

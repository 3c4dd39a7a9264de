"""GridNav world: determinism, held-out splits, motion model."""

import json
import math

import pytest

from vlmtrain.envs.gridnav import (FORWARD, FORWARD_M, LEFT, RIGHT, STOP, TURN_RAD, EpisodeSpec,
                                   GridObject, Layout, Pose, goal_distance, make_episode, step)
from vlmtrain.envs.gridnav.world import footprint_distance


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


# The eight instruction templates, written out here (not imported) so a changed or lost template
# fails the test; "C" stands for the goal colour.
TEMPLATES = {
    "walk to the C box and stop",
    "go to the C box",
    "find the C box and stop next to it",
    "navigate to the C box",
    "head over to the C box and wait there",
    "move toward the C box and stop",
    "go find the C box",
    "stop when you reach the C box",
}


def test_instructions_name_the_goal_with_known_templates() -> None:
    seen = set()
    for i in range(200):
        s = make_episode(0, "train", i)
        colour = s.goal_object.color
        assert colour in {"red", "green", "blue", "yellow", "purple", "cyan"}
        template = s.instruction.replace(colour, "C")
        assert template in TEMPLATES, s.instruction
        seen.add(template)
    assert seen == TEMPLATES  # 200 uniform draws over 8 templates hit every one


def test_json_round_trip() -> None:
    s = make_episode(11, "val", 5)
    assert EpisodeSpec.from_json(s.to_json()) == s
    assert EpisodeSpec.from_json(json.loads(json.dumps(s.to_json()))) == s


def test_json_of_a_hand_made_spec() -> None:
    lay = Layout(6.0, 5.5, (GridObject(4.0, 3.0, 0.5, 1.0, "red"),
                            GridObject(1.5, 1.25, 0.5, 1.0, "cyan")), (170, 165, 160), (100, 96, 90))
    spec = EpisodeSpec("val", 3, 42, lay, Pose(1.0, 2.0, -math.pi / 2), 1, "go to the cyan box")
    d = spec.to_json()
    assert d == {
        "split": "val", "index": 3, "seed": 42,
        "layout": {
            "width": 6.0, "depth": 5.5,
            "objects": [
                {"x": 4.0, "y": 3.0, "size": 0.5, "height": 1.0, "color": "red", "kind": "box"},
                {"x": 1.5, "y": 1.25, "size": 0.5, "height": 1.0, "color": "cyan", "kind": "box"},
            ],
            "wall_rgb": [170, 165, 160], "floor_rgb": [100, 96, 90],
        },
        "start": {"x": 1.0, "y": 2.0, "heading": -math.pi / 2},
        "goal": 1, "instruction": "go to the cyan box",
    }
    assert spec.goal_object == GridObject(1.5, 1.25, 0.5, 1.0, "cyan")
    back = EpisodeSpec.from_json(json.loads(json.dumps(d)))
    assert back == spec and isinstance(back.layout.wall_rgb, tuple)
    # A spec written before "kind" existed still loads, as a box.
    del d["layout"]["objects"][0]["kind"]
    assert EpisodeSpec.from_json(d).layout.objects[0].kind == "box"


def test_split_layouts_disjoint() -> None:
    layouts = {split: {make_episode(0, split, i).layout for i in range(200)}
               for split in ("train", "val", "test")}
    assert not layouts["train"] & layouts["val"]
    assert not layouts["train"] & layouts["test"]
    assert not layouts["val"] & layouts["test"]
    assert len(layouts["train"]) == 200


# A hand-made 6 m x 6 m room: the motion model only looks at the walls, so box positions do not
# matter and every expected pose below is computed by hand.
ROOM = Layout(6.0, 6.0, (GridObject(4.0, 4.0, 0.5, 1.0, "red"),), (170, 165, 160), (100, 96, 90))
SIN45 = math.sqrt(2) / 2


def _close(p: Pose, x: float, y: float, heading_deg: float) -> bool:
    return (math.isclose(p.x, x, abs_tol=1e-12) and math.isclose(p.y, y, abs_tol=1e-12)
            and math.isclose(p.heading, math.radians(heading_deg), abs_tol=1e-12))


def test_step_forward_moves_quarter_metre_along_heading() -> None:
    assert FORWARD_M == 0.25 and math.isclose(TURN_RAD, math.radians(15))
    assert _close(step(ROOM, Pose(1.0, 1.0, 0.0), FORWARD), 1.25, 1.0, 0)
    assert _close(step(ROOM, Pose(2.0, 3.0, math.pi / 2), FORWARD), 2.0, 3.25, 90)
    assert _close(step(ROOM, Pose(2.0, 3.0, math.pi), FORWARD), 1.75, 3.0, 180)
    assert _close(step(ROOM, Pose(2.0, 3.0, -math.pi / 2), FORWARD), 2.0, 2.75, -90)
    assert _close(step(ROOM, Pose(2.0, 3.0, math.pi / 4), FORWARD),
                  2.0 + 0.25 * SIN45, 3.0 + 0.25 * SIN45, 45)
    # 0.25 * (cos 30, sin 30) = (0.2165063509, 0.125)
    assert _close(step(ROOM, Pose(2.0, 3.0, math.radians(30)), FORWARD), 2.2165063509461097,
                  3.125, 30)


def test_step_wall_collision_keeps_pose() -> None:
    # FORWARD is refused when it would end closer than 0.2 m to a wall, on all four walls.
    for pose in (Pose(0.4, 3.0, math.pi), Pose(5.6, 3.0, 0.0),
                 Pose(3.0, 0.4, -math.pi / 2), Pose(3.0, 5.6, math.pi / 2)):
        assert step(ROOM, pose, FORWARD) == pose, pose
    # 0.05 m further from the wall the same move ends 0.25 m from it and is allowed.
    assert _close(step(ROOM, Pose(0.5, 3.0, math.pi), FORWARD), 0.25, 3.0, 180)
    assert _close(step(ROOM, Pose(5.5, 3.0, 0.0), FORWARD), 5.75, 3.0, 0)
    assert _close(step(ROOM, Pose(3.0, 0.5, -math.pi / 2), FORWARD), 3.0, 0.25, -90)
    assert _close(step(ROOM, Pose(3.0, 5.5, math.pi / 2), FORWARD), 3.0, 5.75, 90)
    # Walking +x from x = 1 stops at x = 5.75: 19 moves, the 20th (to 6.0) is a collision.
    p = Pose(1.0, 2.0, 0.0)
    for _ in range(25):
        p = step(ROOM, p, FORWARD)
    assert _close(p, 5.75, 2.0, 0)


def test_stop_keeps_pose_and_unknown_action_raises() -> None:
    p = Pose(2.5, 1.5, math.radians(-60))
    assert step(ROOM, p, STOP) == p
    assert step(ROOM, Pose(0.3, 0.3, math.pi), STOP) == Pose(0.3, 0.3, math.pi)
    with pytest.raises(ValueError):
        step(ROOM, p, 4)


def test_turn_arithmetic() -> None:
    p = Pose(2.0, 2.0, 0.0)
    left = step(ROOM, p, LEFT)
    assert _close(left, 2.0, 2.0, 15) and (left.x, left.y) == (p.x, p.y)
    assert _close(step(ROOM, p, RIGHT), 2.0, 2.0, -15)
    assert step(ROOM, left, RIGHT) == p
    # Turns never move the agent, even right next to a wall.
    assert _close(step(ROOM, Pose(0.2, 0.2, 0.0), RIGHT), 0.2, 0.2, -15)
    q = p
    for _ in range(6):
        q = step(ROOM, q, LEFT)
    assert _close(q, 2.0, 2.0, 90)
    assert _close(step(ROOM, q, FORWARD), 2.0, 2.25, 90)  # after 6 LEFTs, FORWARD goes +y
    for _ in range(6):
        q = step(ROOM, q, LEFT)
    assert _close(q, 2.0, 2.0, 180)
    q = step(ROOM, q, LEFT)
    assert _close(q, 2.0, 2.0, -165)  # wrapped into (-180, 180]
    for _ in range(11):
        q = step(ROOM, q, LEFT)
    assert q == p  # 24 LEFTs: exactly back, headings stay on multiples of 15 degrees
    for _ in range(12):
        q = step(ROOM, q, RIGHT)
    assert _close(q, 2.0, 2.0, 180)  # -180 is reported as +180
    # Three LEFTs then FORWARD: 45 degrees, (0.25 cos 45, 0.25 sin 45) = 0.1767766953 each.
    r = step(ROOM, step(ROOM, step(ROOM, step(ROOM, p, LEFT), LEFT), LEFT), FORWARD)
    assert _close(r, 2.1767766952966368, 2.1767766952966368, 45)

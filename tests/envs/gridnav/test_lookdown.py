"""GridNav written with InternData-N1's look-down setting (``write_dataset(lookdown_pitch=30)``): the
columns and frames of ``125cm_30deg``, pixel goals that are where the stored look-down camera sees
the goal frame's position (checked with the stored camera-to-world matrices and a pinhole, not with
the generator's camera code), and an ``internvla_n1`` source reading it under the reference rules."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from vlmtrain.data.formats.internvla_n1 import read_internvla_n1
from vlmtrain.data.formats.internvla_n1_reference import sample_kind
from vlmtrain.envs.gridnav.generate import write_dataset

SIZE = 64
DOWN = "125cm_30deg"


@pytest.fixture(scope="module")
def n1_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gridnav_n1") / "train"
    write_dataset(root, episodes=8, seed=0, split="train", detour_p=0.5, lookdown_pitch=30, workers=1)
    return root


def _episodes(root):
    for path in sorted((root / "data" / "chunk-000").glob("episode_*.parquet")):
        yield pq.read_table(path).to_pydict()


def test_the_lookdown_setting_is_written(n1_root):
    info = json.loads((n1_root / "meta" / "info.json").read_text())
    for key in (f"observation.images.rgb.{DOWN}", f"pose.{DOWN}", f"goal.{DOWN}", f"relative_goal_frame_id.{DOWN}"):
        assert key in info["features"]
    meta = json.loads((n1_root / "meta" / "gridnav.json").read_text())
    assert (meta["lookdown_setting"], meta["lookdown_pitch"]) == (DOWN, 30)
    cols = next(_episodes(n1_root))
    n = len(cols["frame_index"])
    for t in (0, n - 1):
        level = n1_root / f"videos/chunk-000/observation.images.rgb.125cm_0deg/episode_000000_{t}.jpg"
        down = n1_root / f"videos/chunk-000/observation.images.rgb.{DOWN}/episode_000000_{t}.jpg"
        assert level.is_file() and down.is_file() and level.read_bytes() != down.read_bytes()


def test_pixel_goals_are_where_the_stored_camera_sees_the_goal_position(n1_root):
    """u = f x / z + size / 2, v = f y / z + size / 2 with f = size / 2 (90 degrees), in the camera frame
    of the stored look-down camera-to-world matrix at frame s, for the position of frame s + id."""
    f = SIZE / 2
    checked = none = 0
    for cols in _episodes(n1_root):
        level = np.array(cols["pose.125cm_0deg"])
        down = np.array(cols[f"pose.{DOWN}"])
        for s, (gid, goal) in enumerate(zip(cols[f"relative_goal_frame_id.{DOWN}"], cols[f"goal.{DOWN}"])):
            if gid == -1:
                assert goal == [-1.0, -1.0]
                none += 1
                continue
            assert gid >= 1
            target = level[s + gid][:3, 3].copy()
            target[2] = 0.0  # the floor under the camera of frame s + id
            x, y, z = down[s][:3, :3].T @ (target - down[s][:3, 3])
            assert z > 0
            assert goal == pytest.approx([f * x / z + SIZE / 2, f * y / z + SIZE / 2], abs=1e-6)
            assert 0 <= goal[0] < SIZE and 0 <= goal[1] < SIZE
            checked += 1
    assert checked > 50 and none > 10  # both kinds of frame occur


def test_an_internvla_n1_source_reads_it_under_the_reference_rules(n1_root):
    """Counts re-derived from the parquet columns by the rules: starts 0, 4, ... without the last two
    frames; goal id -1: a turn unless the target is forward; >= 3: a pixel goal; 5 STOP copies. The
    targets are GridNav's expert labels (``expert_action``: its demonstrations execute noisy actions,
    the labels stay the expert's), which the LeRobot reader takes over ``action[1:] + [0]``."""
    want: Counter[str] = Counter()
    for cols in _episodes(n1_root):
        targets = cols["expert_action"]
        ids = cols[f"relative_goal_frame_id.{DOWN}"]
        n = len(targets)
        for s in range(0, n - 1, 4):
            if ids[s] == -1:
                want["turn"] += targets[s] != 1
            elif ids[s] >= 3:
                want["pixel_goal"] += 1
        want["stop"] += 5
    samples = read_internvla_n1(n1_root, "gridnav_125cm_0_30")
    assert Counter(sample_kind(s) for s in samples) == want
    assert want["pixel_goal"] > 0 and want["turn"] > 0
    goal = next(s for s in samples if sample_kind(s) == "pixel_goal")
    assert str(goal.images[-1].path).split("/")[-2] == f"observation.images.rgb.{DOWN}"
    assert goal.turns[1][1].startswith("You are an autonomous navigation assistant. Your task is to ")
    assert ". Where should you go next" in goal.turns[1][1]  # GridNav's instruction gets its period

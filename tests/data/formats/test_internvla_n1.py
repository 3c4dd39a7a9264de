"""InternData-N1 scenes read the InternVLA-N1 way: names, sample kinds, answers, images, ``%N``.

The scene is written by hand from the documented LeRobot v2.1 layout (two camera settings and a
goal column); expectations are derived from the fixture's own actions and goals.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmtrain.data.conversation import count_placeholders, validate_sample
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.internvla_n1 import (
    INSTRUCTION_SEP,
    LOOKDOWN_SYMBOL,
    SAMPLE_KINDS,
    parse_dataset_name,
)
from vlmtrain.data.formats.internvla_n1 import read_internvla_n1 as _read_internvla_n1
from vlmtrain.data.formats.internvla_n1_reference import N1Rules
from vlmtrain.data.formats.lerobot import ACTION_SYMBOLS
from vlmtrain.data.mixture import planned_count
from vlmtrain.data.samples import history_indices

HIST, DOWN = "125cm_0deg", "125cm_30deg"
# These tests check vlmtrain's every-frame rule; tests/data/formats/test_internvla_n1_reference.py
# checks the default, InternNav's reference rules.
EVERY_FRAME = N1Rules(samples="every_frame", prompt="vlmtrain")


def read_internvla_n1(*args, **kwargs):
    """``read_internvla_n1`` under the every-frame rule (unless a test passes ``rules``)."""
    kwargs.setdefault("rules", EVERY_FRAME)
    return _read_internvla_n1(*args, **kwargs)
NAME = "r2r_125cm_0_30"
NO = [-1.0, -1.0]
# episode -> executed actions (action[0] = -1: the action that led into each frame) and goals.
EPISODES: dict[int, dict[str, Any]] = {
    0: {
        "actions": [-1, 1, 1, 2, 2, 1, 1, 0],
        "goals": [NO, [10.4, 20.6], NO, [3.0, 7.0], NO, NO, NO, NO],
        "task": "walk to the sofa",
    },
    1: {
        "actions": [-1, 3, 3, 3, 1, 0],
        "goals": [NO, NO, [0.0, 5.0], NO, NO, NO],
        "task": "turn right and stop",
    },
}


def frame_path(root: Path, setting: str, e: int, t: int) -> Path:
    """Where the LeRobot layout keeps frame t of episode e for a camera setting."""
    key = f"observation.images.rgb.{setting}"
    return root / "videos" / "chunk-000" / key / f"episode_{e:06d}_{t}.jpg"


def parquet_path(root: Path, e: int) -> Path:
    """Where the LeRobot layout keeps episode e's parquet."""
    return root / "data" / "chunk-000" / f"episode_{e:06d}.parquet"


def write_scene(
    root: Path,
    episodes: dict[int, dict[str, Any]] = EPISODES,
    settings: tuple[str, ...] = (HIST, DOWN),
    drop_goal: tuple[int, ...] = (),
) -> Path:
    """Write one InternData-N1 scene (LeRobot v2.1) with the given camera settings."""
    (root / "meta").mkdir(parents=True)
    info = {"codebase_version": "v2.1", "chunks_size": 1000, "fps": 10,
            "total_episodes": len(episodes)}
    (root / "meta" / "info.json").write_text(json.dumps(info), encoding="utf-8")
    lines = [
        json.dumps({"episode_index": e, "tasks": [ep["task"]], "length": len(ep["actions"])})
        for e, ep in episodes.items()
    ]
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    start = 0
    for e, ep in episodes.items():
        n = len(ep["actions"])
        cols: dict[str, Any] = {
            "action": pa.array(ep["actions"], pa.int64()),
            "frame_index": pa.array(range(n), pa.int64()),
            "episode_index": pa.array([e] * n, pa.int64()),
            "index": pa.array(range(start, start + n), pa.int64()),
            "task_index": pa.array([e] * n, pa.int64()),
            "timestamp": [t / 10 for t in range(n)],
        }
        for s in settings:
            cols[f"pose.{s}"] = [np.eye(4).tolist()] * n
        if DOWN in settings and e not in drop_goal:
            cols[f"goal.{DOWN}"] = ep["goals"]
            cols[f"relative_goal_frame_id.{DOWN}"] = pa.array([-1] * n, pa.int64())
        start += n
        parquet_path(root, e).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), parquet_path(root, e))
        for s in settings:
            for t in range(n):
                f = frame_path(root, s, e, t)
                f.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4), (e * 60, t * 20, 0 if s == HIST else 200)).save(f, "JPEG")
    return root


def expected_target(actions: list[int], t: int) -> int:
    """The decision target at frame t: the next executed action, STOP at the last frame."""
    return actions[t + 1] if t + 1 < len(actions) else 0


def expected_kind(ep: dict[str, Any], t: int, with_lookdown: bool) -> str:
    """The sample kind the module docstring promises for frame t."""
    target = expected_target(ep["actions"], t)
    if target == 0:
        return "stop"
    if with_lookdown and ep["goals"][t] != NO:
        return "pixel_goal"
    return "turn" if target in (2, 3) else "action"


def expected_answer(actions: list[int], t: int, horizon: int) -> str:
    """Symbol of the target repeated over the run of identical targets (capped; STOP once)."""
    targets = [expected_target(actions, i) for i in range(len(actions))]
    run = 1
    if targets[t] != 0:
        while run < horizon and t + run < len(targets) and targets[t + run] == targets[t]:
            run += 1
    return ACTION_SYMBOLS[targets[t]] * run


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    return write_scene(tmp_path / "scene_a")


# --------------------------------------------------------------------------------------------


def test_parse_dataset_name() -> None:
    spec = parse_dataset_name("r2r_125cm_0_30%50")
    assert (spec.name, spec.corpus, spec.height_cm) == ("r2r_125cm_0_30", "r2r", 125)
    assert (spec.history_pitch, spec.lookdown_pitch, spec.percent) == (0, 30, 50.0)
    assert (spec.history_setting, spec.lookdown_setting) == ("125cm_0deg", "125cm_30deg")
    plain = parse_dataset_name("scale_vln_60cm_15_15")
    assert (plain.corpus, plain.height_cm, plain.percent) == ("scale_vln", 60, 100.0)


@pytest.mark.parametrize(
    "bad", ["r2r_125_0_30", "r2r_125cm_0", "125cm_0_30", "r2r_125cm_0_30%x", "r2r_125cm_a_30", "%50"]
)
def test_parse_dataset_name_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="r2r_125cm_0_30|name"):
        parse_dataset_name(bad)


@pytest.mark.parametrize("horizon", [1, 3])
def test_samples_follow_the_documented_rules(scene: Path, horizon: int) -> None:
    samples = read_internvla_n1(scene, NAME, horizon=horizon)
    assert len(samples) == sum(len(ep["actions"]) for ep in EPISODES.values())
    by_record = {s.record: s for s in samples}
    for e, ep in EPISODES.items():
        for t in range(len(ep["actions"])):
            s = by_record[f"scene_a/episode {e} t={t}"]
            assert s.source == NAME
            assert ep["task"] in s.turns[0][1]
            kind = expected_kind(ep, t, with_lookdown=True)
            hist = [str(frame_path(scene, HIST, e, h)) for h in history_indices(t)]
            current = str(frame_path(scene, HIST, e, t))
            paths = [im.path for im in s.images]
            assert count_placeholders(s.turns) == len(s.images)
            if kind == "pixel_goal":
                u, v = ep["goals"][t]
                assert [r for r, _ in s.turns] == ["user", "assistant", "user", "assistant"]
                assert s.turns[1][1] == LOOKDOWN_SYMBOL
                assert s.turns[3][1] == f"{round(u)} {round(v)}"
                assert paths == hist + [current, str(frame_path(scene, DOWN, e, t))]
                assert "<image>" in s.turns[2][1]
            else:
                assert [r for r, _ in s.turns] == ["user", "assistant"]
                assert s.turns[1][1] == expected_answer(ep["actions"], t, horizon)
                assert paths == hist + [current]


def test_all_kinds_present_and_samples_valid(scene: Path) -> None:
    samples = read_internvla_n1(scene, NAME)
    policy = ErrorPolicy("raise")
    assert all(validate_sample(s, scene, policy, check_files=True, verify_images=True) for s in samples)
    answers = {s.turns[1][1][0] for s in samples}
    assert {"S", LOOKDOWN_SYMBOL, "←", "→", "↑"} <= answers


def test_kinds_filter_reproduces_internnav_mix(scene: Path) -> None:
    kept = read_internvla_n1(scene, NAME, kinds=("pixel_goal", "turn", "stop"))
    want = sum(
        expected_kind(ep, t, True) != "action"
        for ep in EPISODES.values() for t in range(len(ep["actions"]))
    )
    assert len(kept) == want
    assert all(not s.turns[1][1].startswith("↑") for s in kept)
    with pytest.raises(ValueError, match="kind"):
        read_internvla_n1(scene, NAME, kinds=("bogus",))


def test_without_lookdown_setting_goal_frames_fall_back(tmp_path: Path) -> None:
    root = write_scene(tmp_path / "s", settings=(HIST,))
    samples = read_internvla_n1(root, NAME)
    by_record = {s.record: s for s in samples}
    for e, ep in EPISODES.items():
        for t in range(len(ep["actions"])):
            s = by_record[f"s/episode {e} t={t}"]
            assert expected_kind(ep, t, with_lookdown=False) != "pixel_goal"
            assert s.turns[1][1] == expected_answer(ep["actions"], t, 4)


def test_percent_keeps_a_seeded_subset(scene: Path) -> None:
    full = read_internvla_n1(scene, NAME)
    half = read_internvla_n1(scene, NAME + "%50", seed=1)
    assert len(half) == planned_count(len(full), 50)
    assert set(half) <= set(full) and len(set(half)) == len(half)
    assert read_internvla_n1(scene, NAME + "%50", seed=1) == half
    others = [read_internvla_n1(scene, NAME + "%50", seed=s) for s in range(2, 6)]
    assert any(o != half for o in others)
    double = read_internvla_n1(scene, NAME + "%200")
    assert sorted(double, key=repr) == sorted(full + full, key=repr)


def test_several_instructions_and_scenes(tmp_path: Path) -> None:
    eps = {0: dict(EPISODES[0], task=f"go left{INSTRUCTION_SEP}go to the sofa")}
    write_scene(tmp_path / "corpus" / "scene_b", eps)
    write_scene(tmp_path / "corpus" / "scene_c")
    samples = read_internvla_n1(tmp_path / "corpus", NAME)
    n0 = len(EPISODES[0]["actions"])
    in_b = [s for s in samples if s.record.startswith("scene_b/")]
    assert len(in_b) == 2 * n0
    assert {s.turns[0][1].count("go left") for s in in_b} == {0, 1}
    assert len(samples) - len(in_b) == sum(len(ep["actions"]) for ep in EPISODES.values())


def test_missing_goal_column_is_reported(tmp_path: Path) -> None:
    root = write_scene(tmp_path / "s", drop_goal=(1,))
    with pytest.raises(DataError) as info:
        read_internvla_n1(root, NAME)
    assert info.value.reason == "missing_column" and info.value.record == 1
    assert "episode_000001.parquet" in str(info.value) and f"goal.{DOWN}" in str(info.value)


def test_missing_lookdown_frame_reported_once(tmp_path: Path) -> None:
    root = write_scene(tmp_path / "s")
    os.remove(frame_path(root, DOWN, 1, 2))
    policy = ErrorPolicy("skip")
    samples = read_internvla_n1(root, NAME, policy=policy)
    assert policy.summary() == {"missing_frame": 1}
    assert {s.record.split(" t=")[0] for s in samples} == {"s/episode 0"}


def test_bad_goal_value(tmp_path: Path) -> None:
    eps = {0: dict(EPISODES[0], goals=[NO, [-1.0, 4.0]] + [NO] * 6)}
    root = write_scene(tmp_path / "s", eps)
    with pytest.raises(DataError, match="bad_goal"):
        read_internvla_n1(root, NAME)


"""Tests for the LeRobot v2.1 VLN reader and the data error policy.

The fixture dataset is written by hand following docs/data_formats.md, independent of the GridNav
generator, so the reader is checked against the documented layout rather than against one writer.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.lerobot import (
    ACTION_SYMBOLS,
    VALID_ACTIONS,
    iter_dataset_roots,
    read_lerobot_vln,
)

SETTING = "125cm_0deg"
KEY = f"observation.images.rgb.{SETTING}"

# episode -> executed actions (action[0] = -1) and, for episode 1, an expert label column.
ACTIONS = {
    0: [-1, 1, 2, 0],
    1: [-1, 1, 3, 1, 0],
    2: [-1, 3, 0],
}
EXPERT = {1: [1, 2, 1, 0, 0]}  # differs from action[t+1] where the demo injected noise


def _pose(episode: int, t: int) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, 3] = [episode, t, 0.5 * t]
    return pose


def _parquet_path(root: Path, e: int) -> Path:
    return root / "data" / "chunk-000" / f"episode_{e:06d}.parquet"


def _frame_path(root: Path, e: int, t: int) -> Path:
    return root / "videos" / "chunk-000" / KEY / f"episode_{e:06d}_{t}.jpg"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_episode(root: Path, e: int, actions: list[int], flat_pose: bool, start: int) -> None:
    n = len(actions)
    poses = [_pose(e, t) for t in range(n)]
    cols: dict[str, Any] = {
        "action": pa.array(actions, pa.int64()),
        # flat on one episode, nested on the others: the reader must accept both
        f"pose.{SETTING}": [p.ravel().tolist() if flat_pose else p.tolist() for p in poses],
        f"goal.{SETTING}": [[-1.0, -1.0]] * n,
        f"relative_goal_frame_id.{SETTING}": pa.array([-1] * n, pa.int64()),
        # another setting's pose, to check only the requested one is used
        "pose.125cm_30deg": [np.zeros((4, 4)).tolist()] * n,
        "timestamp": [t / 10 for t in range(n)],
        "frame_index": pa.array(range(n), pa.int64()),
        "episode_index": pa.array([e] * n, pa.int64()),
        "index": pa.array(range(start, start + n), pa.int64()),
        "task_index": pa.array([e] * n, pa.int64()),
    }
    if e in EXPERT:
        cols["expert_action"] = pa.array(EXPERT[e], pa.int64())
    path = _parquet_path(root, e)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    for t in range(n):
        frame = _frame_path(root, e, t)
        frame.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (e * 40, t * 20, 0)).save(frame, format="JPEG")


def make_dataset(root: Path) -> Path:
    """Write a 3-episode LeRobot v2.1 VLN root by hand."""
    (root / "meta").mkdir(parents=True)
    total = sum(len(a) for a in ACTIONS.values())
    info = {
        "codebase_version": "v2.1",
        "total_episodes": len(ACTIONS),
        "total_frames": total,
        "total_tasks": len(ACTIONS),
        "chunks_size": 1000,
        "fps": 10,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        # standard LeRobot mp4 template: the reader must fall back to per-frame JPEGs
        "video_path": (
            "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
        ),
        "features": {},
    }
    (root / "meta" / "info.json").write_text(json.dumps(info), encoding="utf-8")
    _write_jsonl(
        root / "meta" / "episodes.jsonl",
        [
            {"episode_index": e, "tasks": [f"walk to box {e}"], "length": len(a)}
            for e, a in ACTIONS.items()
        ],
    )
    _write_jsonl(
        root / "meta" / "tasks.jsonl",
        [{"task_index": e, "task": f"walk to box {e}"} for e in ACTIONS],
    )
    start = 0
    for e, actions in ACTIONS.items():
        _write_episode(root, e, actions, flat_pose=(e == 2), start=start)
        start += len(actions)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "scene_a")


# ------------------------------------------------------------------------------------- errors


def test_data_error_message_and_attributes(tmp_path: Path) -> None:
    err = DataError(tmp_path / "x.parquet", "length_mismatch", 7, "3 rows vs length 4")
    assert str(err) == f"{tmp_path / 'x.parquet'}: episode 7: length_mismatch: 3 rows vs length 4"
    assert (err.path.name, err.record, err.reason) == ("x.parquet", 7, "length_mismatch")
    assert err.detail == "3 rows vs length 4"
    assert isinstance(err, ValueError)
    assert str(DataError("meta/info.json", "missing_file")) == "meta/info.json: missing_file"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.reason == err.reason


def test_error_policy_modes() -> None:
    with pytest.raises(ValueError, match="raise.*skip"):
        ErrorPolicy("ignore")
    with pytest.raises(DataError):
        ErrorPolicy("raise").handle(DataError("f", "bad_json", 1))
    policy = ErrorPolicy("skip")
    for i in range(7):
        policy.handle(DataError("f", "bad_json", i))
    policy.handle(DataError("g", "missing_frame", 0))
    assert policy.summary() == {"bad_json": 7, "missing_frame": 1}
    assert len(policy.examples["bad_json"]) == 5
    assert policy.examples["bad_json"][0] == "f: episode 0: bad_json"


# ---------------------------------------------------------------------------------- good data


def test_constants() -> None:
    assert VALID_ACTIONS == {0, 1, 2, 3}
    assert ACTION_SYMBOLS == {0: "STOP", 1: "↑", 2: "←", 3: "→"}


def test_reads_good_dataset(dataset: Path) -> None:
    episodes = read_lerobot_vln(dataset, SETTING)
    assert [ep.episode_index for ep in episodes] == [0, 1, 2]
    ep0, ep1, ep2 = episodes

    # without expert_action: target[t] = action[t+1], STOP at the end
    assert ep0.targets.dtype == np.int64
    assert ep0.targets.tolist() == [1, 2, 0, 0]
    assert ep2.targets.tolist() == [3, 0, 0]
    # with expert_action: the expert label wins over the executed next action
    assert ep1.targets.tolist() == [1, 2, 1, 0, 0]

    assert ep0.instructions == ("walk to box 0",)
    assert ep1.length == 5 and ep1.root == dataset
    assert ep1.frame_paths == tuple(_frame_path(dataset, 1, t) for t in range(5))
    assert all(p.is_file() for ep in episodes for p in ep.frame_paths)

    for ep in episodes:  # ep2 has flat poses, the others nested ones
        assert ep.poses.dtype == np.float32 and ep.poses.shape == (ep.length, 4, 4)
        expected = np.stack([_pose(ep.episode_index, t) for t in range(ep.length)])
        np.testing.assert_allclose(ep.poses, expected)
    assert not ep0.targets.flags.writeable


def test_check_frames_off_does_not_need_frames(dataset: Path) -> None:
    _frame_path(dataset, 0, 1).unlink()
    episodes = read_lerobot_vln(dataset, SETTING, check_frames=False)
    assert len(episodes) == 3


def test_iter_dataset_roots(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    make_dataset(corpus / "r2r" / "scene_b")
    make_dataset(corpus / "r2r" / "scene_a")
    make_dataset(corpus / "rxr" / "group" / "scene_c")
    (corpus / "empty_dir").mkdir()
    assert iter_dataset_roots(corpus) == [
        corpus / "r2r" / "scene_a",
        corpus / "r2r" / "scene_b",
        corpus / "rxr" / "group" / "scene_c",
    ]
    assert iter_dataset_roots(corpus / "r2r" / "scene_a") == [corpus / "r2r" / "scene_a"]
    assert iter_dataset_roots(corpus / "empty_dir") == []
    with pytest.raises(FileNotFoundError):
        iter_dataset_roots(tmp_path / "missing")


# ----------------------------------------------------------------------------------- bad data


def _rewrite_parquet(path: Path, **changes: Any) -> None:
    """Replace (value) or drop (None) columns of an episode parquet."""
    table = pq.read_table(path)
    for name, value in changes.items():
        table = table.drop_columns([name])
        if value is not None:
            table = table.append_column(name, pa.array(value, pa.int64()))
    pq.write_table(table, path)


def _break_missing_frame(root: Path) -> tuple[str, str]:
    _frame_path(root, 1, 2).unlink()
    return "missing_frame", "episode_000001_2.jpg"


def _break_length(root: Path) -> tuple[str, str]:
    lines = (root / "meta" / "episodes.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    rows[1]["length"] = 6
    _write_jsonl(root / "meta" / "episodes.jsonl", rows)
    return "length_mismatch", "episode_000001.parquet"


def _break_missing_column(root: Path) -> tuple[str, str]:
    _rewrite_parquet(_parquet_path(root, 1), frame_index=None)
    return "missing_column", "episode_000001.parquet"


def _break_unknown_action(root: Path) -> tuple[str, str]:
    _rewrite_parquet(_parquet_path(root, 1), action=[-1, 1, 7, 1, 0])
    return "unknown_action", "episode_000001.parquet"


def _break_minus_one_late(root: Path) -> tuple[str, str]:
    _rewrite_parquet(_parquet_path(root, 1), action=[-1, 1, -1, 1, 0])
    return "unknown_action", "episode_000001.parquet"


def _break_expert_action(root: Path) -> tuple[str, str]:
    _rewrite_parquet(_parquet_path(root, 1), expert_action=[1, 2, 4, 0, 0])
    return "unknown_action", "episode_000001.parquet"


def _break_json_line(root: Path) -> tuple[str, str]:
    lines = (root / "meta" / "episodes.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-5]  # truncated line, as after an interrupted write
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    return "bad_json", "episodes.jsonl"


def _break_missing_parquet(root: Path) -> tuple[str, str]:
    _parquet_path(root, 1).unlink()
    return "missing_file", "episode_000001.parquet"


def _break_frame_index(root: Path) -> tuple[str, str]:
    _rewrite_parquet(_parquet_path(root, 1), frame_index=[0, 1, 3, 2, 4])
    return "bad_frame_index", "episode_000001.parquet"


BREAKERS = [
    _break_missing_frame,
    _break_length,
    _break_missing_column,
    _break_unknown_action,
    _break_minus_one_late,
    _break_expert_action,
    _break_json_line,
    _break_missing_parquet,
    _break_frame_index,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.removeprefix("_break_"))
def test_bad_episode_raises_naming_file_and_episode(dataset: Path, breaker) -> None:
    reason, file_name = breaker(dataset)
    with pytest.raises(DataError) as info:
        read_lerobot_vln(dataset, SETTING)
    err = info.value
    assert err.reason == reason
    assert file_name in str(err)
    assert "episode 1" in str(err)
    assert err.record == 1


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.removeprefix("_break_"))
def test_bad_episode_is_skipped_and_counted(dataset: Path, breaker) -> None:
    reason, _ = breaker(dataset)
    policy = ErrorPolicy("skip")
    episodes = read_lerobot_vln(dataset, SETTING, policy=policy)
    assert [ep.episode_index for ep in episodes] == [0, 2]
    assert policy.summary() == {reason: 1}
    assert "episode 1" in policy.examples[reason][0]


@pytest.mark.parametrize("damage, message", [
    (_break_missing_column, r"frame_index.*present: .*action"),
    (_break_length, r"5 rows.*length 6"),
    (_break_unknown_action, r"row 2: action 7"),
    (_break_json_line, r"line 2"),
], ids=["missing_column", "length", "unknown_action", "json_line"])
def test_error_details_are_informative(dataset: Path, damage, message) -> None:
    damage(dataset)
    with pytest.raises(DataError, match=message):
        read_lerobot_vln(dataset, SETTING)


def test_wrong_setting_is_a_missing_column(dataset: Path) -> None:
    with pytest.raises(DataError, match=r"pose\.90cm_0deg") as info:
        read_lerobot_vln(dataset, "90cm_0deg")
    assert info.value.reason == "missing_column"


def test_missing_info_json(dataset: Path) -> None:
    (dataset / "meta" / "info.json").unlink()
    with pytest.raises(DataError, match="info.json") as info:
        read_lerobot_vln(dataset, SETTING)
    assert info.value.reason == "missing_file"
    policy = ErrorPolicy("skip")
    assert read_lerobot_vln(dataset, SETTING, policy=policy) == []
    assert policy.summary() == {"missing_file": 1}


def test_chunk_and_template_from_info(tmp_path: Path) -> None:
    """Episode e lives in chunk e // chunks_size; a per-frame video_path template is honoured."""
    root = tmp_path / "scene"
    (root / "meta").mkdir(parents=True)
    info = {
        "chunks_size": 2,
        "video_path": "frames/c{episode_chunk}/{video_key}/{episode_index}/{frame_index:03d}.jpg",
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    _write_jsonl(
        root / "meta" / "episodes.jsonl",
        [{"episode_index": e, "tasks": ["go"], "length": 2} for e in range(3)],
    )
    for e in range(3):
        path = root / "data" / f"chunk-{e // 2:03d}" / f"episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "action": pa.array([-1, 0], pa.int64()),
                    f"pose.{SETTING}": [np.eye(4).tolist()] * 2,
                    "frame_index": pa.array([0, 1], pa.int64()),
                }
            ),
            path,
        )
        for t in range(2):
            frame = root / "frames" / f"c{e // 2}" / KEY / str(e) / f"{t:03d}.jpg"
            frame.parent.mkdir(parents=True, exist_ok=True)
            frame.write_bytes(b"")
    episodes = read_lerobot_vln(root, SETTING)
    assert [ep.episode_index for ep in episodes] == [0, 1, 2]
    assert episodes[2].frame_paths[1] == root / "frames" / "c1" / KEY / "2" / "001.jpg"
    assert episodes[0].targets.tolist() == [0, 0]

"""GridNav LeRobot v2.1 writer: layout, columns and consistency with the generator."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmtrain.envs.gridnav import (EpisodeSpec, decode_jpeg, demonstrate, episode_rng,
                                   make_episode, observe, write_dataset)

SETTING = "125cm_0deg"


def _read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("workers", [1, 2])
def test_write_dataset(tmp_path: Path, workers: int) -> None:
    n, seed, size = 5, 9, 32
    root = write_dataset(tmp_path / "ds", n, seed, split="val", image_size=size, workers=workers)
    assert root == tmp_path / "ds"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # temp dir renamed away
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["robot_type"] == "gridnav"
    assert info["total_episodes"] == n and info["chunks_size"] == 1000 and info["fps"] == 1
    assert info["splits"] == {"val": "0:5"}
    assert "action" in info["features"] and f"pose.{SETTING}" in info["features"]
    episodes = _read_jsonl(root / "meta/episodes.jsonl")
    tasks = _read_jsonl(root / "meta/tasks.jsonl")
    worlds = _read_jsonl(root / "meta/gridnav_episodes.jsonl")
    params = json.loads((root / "meta/gridnav.json").read_text())
    assert params["seed"] == seed and params["image_size"] == size
    assert [e["episode_index"] for e in episodes] == list(range(n))
    assert info["total_frames"] == sum(e["length"] for e in episodes)
    assert info["total_tasks"] == len(tasks)
    assert [t["task_index"] for t in tasks] == list(range(len(tasks)))
    task_of = {t["task"]: t["task_index"] for t in tasks}

    global_index = 0
    for e in episodes:
        i = e["episode_index"]
        spec = EpisodeSpec.from_json(worlds[i]["spec"])
        assert worlds[i]["episode_index"] == i
        assert spec == make_episode(seed, "val", i)
        assert e["tasks"] == [spec.instruction]
        demo = demonstrate(spec, episode_rng(seed, "val", i, 1), 0.25)
        path = root / info["data_path"].format(episode_chunk=0, episode_index=i)
        assert path == root / f"data/chunk-000/episode_{i:06d}.parquet"
        table = pq.read_table(path)
        schema = table.schema
        for col in ("action", f"relative_goal_frame_id.{SETTING}", "frame_index",
                    "episode_index", "index", "task_index", "expert_action"):
            assert schema.field(col).type == pa.int64(), col
        assert pa.types.is_floating(schema.field("timestamp").type)
        rows = table.to_pydict()
        length = e["length"]
        assert table.num_rows == length == len(demo)
        assert rows["action"][0] == -1
        assert rows["action"][1:] == demo.executed[:-1]
        assert rows["expert_action"] == demo.labels
        assert rows["frame_index"] == list(range(length))
        assert rows["episode_index"] == [i] * length
        assert rows["index"] == list(range(global_index, global_index + length))
        assert rows["task_index"] == [task_of[spec.instruction]] * length
        assert rows[f"goal.{SETTING}"] == [[-1.0, -1.0]] * length
        assert rows[f"relative_goal_frame_id.{SETTING}"] == [-1] * length
        global_index += length
        for t in range(length):
            m = np.asarray(rows[f"pose.{SETTING}"][t])
            assert m.shape == (4, 4)
            p = demo.poses[t]
            assert np.allclose(m[:3, 3], [p.x, p.y, 1.25])
            assert np.allclose(m[:3, 2], [np.cos(p.heading), np.sin(p.heading), 0.0])
            jpg = root / info["video_path"].format(
                episode_chunk=0, video_key=f"observation.images.rgb.{SETTING}",
                episode_index=i, frame_index=t)
            assert jpg == root / (f"videos/chunk-000/observation.images.rgb.{SETTING}/"
                                  f"episode_{i:06d}_{t}.jpg")
            img = decode_jpeg(jpg.read_bytes())
            assert img.shape == (size, size, 3)
            if t == 0:  # the closed-loop evaluator sees exactly the written frames
                assert np.array_equal(img, observe(spec.layout, p, size))
        n_jpgs = len(list(root.glob(f"videos/chunk-000/*/episode_{i:06d}_*.jpg")))
        assert n_jpgs == length
    assert global_index == info["total_frames"]


def test_write_dataset_refuses_existing(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "ds", 1, 0, workers=1)
    write_dataset(tmp_path / "ds", 1, 0, workers=1, overwrite=True)
    assert (tmp_path / "ds/meta/info.json").exists()


def test_data_from_an_older_expert_is_generated_again(tmp_path: Path) -> None:
    """``ensure_gridnav`` keeps data labelled by the current expert and regenerates data whose labels
    came from an older one (written before versions were recorded: no ``expert_version``)."""
    import json

    from vlmtrain.config import DataConfig
    from vlmtrain.envs.gridnav.expert import EXPERT_VERSION
    from vlmtrain.envs.gridnav.generate import expert_version
    from vlmtrain.train.build import ensure_gridnav

    dcfg = DataConfig(root=str(tmp_path / "ds"), gridnav_episodes=2)
    ensure_gridnav(dcfg)
    meta = tmp_path / "ds" / "meta" / "gridnav.json"
    assert expert_version(dcfg.root) == EXPERT_VERSION == 2
    stamp = meta.stat().st_mtime_ns
    ensure_gridnav(dcfg)  # current: kept as it is
    assert meta.stat().st_mtime_ns == stamp
    old = json.loads(meta.read_text())
    del old["expert_version"]
    meta.write_text(json.dumps(old))
    assert expert_version(dcfg.root) == 1
    ensure_gridnav(dcfg)
    assert expert_version(dcfg.root) == EXPERT_VERSION
    assert expert_version(tmp_path / "nothing") is None

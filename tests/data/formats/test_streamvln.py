"""StreamVLN trajectory folders: alignment of actions to frames, numeric frame order, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlmtrain.data.conversation import validate_sample
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.internvla_n1 import build_episode_samples
from vlmtrain.data.formats.lerobot import VLNEpisode
from vlmtrain.data.formats.streamvln import read_streamvln
from vlmtrain.data.samples import build_vln_samples

# 12 frames, so lexicographic order ("10.jpg" < "2.jpg") and numeric order differ.
LEADING = {"id": 7, "video": "images/scan_a_000007", "instructions": ["Walk past the bed.", "Go out."],
           "actions": [-1, 1, 1, 2, 2, 2, 1, 3, 1, 1, 1, 0]}
PLAIN = {"id": "ep_b", "video": "images/scan_b", "instructions": "Turn around.",
         "actions": [2, 2, 1, 0]}


def write_streamvln(root: Path, entries: list[dict[str, Any]], names: dict[str, list[str]] | None = None) -> Path:
    """Write annotations.json and one JPEG per action under <video>/rgb (names: video -> files)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotations.json").write_text(json.dumps(entries), encoding="utf-8")
    for entry in entries:
        n = len(entry["actions"])
        files = (names or {}).get(entry["video"]) or [f"{i}.jpg" for i in range(n)]
        rgb = root / entry["video"] / "rgb"
        rgb.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(files):
            Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(rgb / name, "JPEG")
    return root


def test_alignment_with_leading_minus_one(tmp_path: Path) -> None:
    root = write_streamvln(tmp_path / "R2R", [LEADING])
    (ep,) = read_streamvln(root)
    acts = LEADING["actions"]
    assert isinstance(ep, VLNEpisode)
    assert ep.length == len(acts)
    # target at t = the action taken at t = the action that led into t+1; STOP at the end
    for t in range(ep.length - 1):
        assert ep.targets[t] == acts[t + 1]
    assert ep.targets[-1] == 0
    assert [p.name for p in ep.frame_paths] == [f"{i}.jpg" for i in range(len(acts))]
    assert ep.instructions == tuple(LEADING["instructions"])
    assert ep.poses.shape == (ep.length, 4, 4) and np.isnan(ep.poses).all()
    assert not ep.targets.flags.writeable


def test_alignment_without_leading_minus_one(tmp_path: Path) -> None:
    names = {PLAIN["video"]: ["frame_003.jpg", "frame_001.jpg", "frame_000.jpg", "frame_002.jpg"]}
    root = write_streamvln(tmp_path / "R2R", [LEADING, PLAIN], names)
    _, ep = read_streamvln(root)
    assert ep.episode_index == 1
    assert ep.instructions == ("Turn around.",)
    assert ep.targets.tolist() == PLAIN["actions"][:-1] + [0]
    assert [p.name for p in ep.frame_paths] == [f"frame_{i:03d}.jpg" for i in range(4)]


def test_existing_sample_builders_accept_streamvln_episodes(tmp_path: Path) -> None:
    root = write_streamvln(tmp_path / "R2R", [LEADING, PLAIN])
    episodes = read_streamvln(root)
    offsets = np.cumsum([0] + [e.length for e in episodes[:-1]]).tolist()
    samples = build_vln_samples(episodes, offsets, num_history=4)
    assert len(samples) == sum(e.length for e in episodes)
    assert [s.target for s in samples] == [int(x) for e in episodes for x in e.targets]
    conv = build_episode_samples(episodes[0], "r2r", "R2R/episode 0", num_history=4)
    assert len(conv) == episodes[0].length * len(LEADING["instructions"])
    policy = ErrorPolicy("raise")
    assert all(validate_sample(s, root, policy, check_files=True) for s in conv)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda e: e.update(actions=e["actions"] + [1]), "length_mismatch"),
        (lambda e: e["actions"].__setitem__(3, 5), "unknown_action"),
        (lambda e: e["actions"].__setitem__(3, -1), "unknown_action"),
        (lambda e: e.pop("instructions"), "bad_record"),
        (lambda e: e.update(actions="1,2"), "bad_record"),
    ],
)
def test_bad_entries(tmp_path: Path, mutate: Any, reason: str) -> None:
    root = write_streamvln(tmp_path / "R2R", [LEADING, PLAIN])
    entries = json.loads((root / "annotations.json").read_text())
    mutate(entries[1])
    (root / "annotations.json").write_text(json.dumps(entries))
    with pytest.raises(DataError) as info:
        read_streamvln(root)
    assert info.value.reason == reason and "episode 1 (id 'ep_b')" in str(info.value)
    policy = ErrorPolicy("skip")
    kept = read_streamvln(root, policy)
    assert [e.episode_index for e in kept] == [0] and policy.summary() == {reason: 1}


def test_missing_frame_dir_and_bad_names(tmp_path: Path) -> None:
    root = write_streamvln(tmp_path / "R2R", [LEADING, PLAIN])
    shutil.rmtree(root / PLAIN["video"] / "rgb")
    with pytest.raises(DataError, match="missing_frame"):
        read_streamvln(root)
    root2 = write_streamvln(tmp_path / "R2R2", [PLAIN], {PLAIN["video"]: ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]})
    with pytest.raises(DataError, match="bad_frame_name"):
        read_streamvln(root2)


def test_missing_annotations(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="annotations.json: missing_file"):
        read_streamvln(tmp_path)
    policy = ErrorPolicy("skip")
    assert read_streamvln(tmp_path, policy) == [] and policy.summary() == {"missing_file": 1}

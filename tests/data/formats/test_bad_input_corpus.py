"""One corpus of bad inputs, one test: every defect names its file and record, or is counted once.

Each case writes a small dataset with exactly one bad record among good ones. In raise mode the
`DataError` message must contain the file name and the record; in skip mode the good records must
all be kept and ``policy.summary()`` must count exactly one skip, under the right reason.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

# Fixture writers shared with the per-format tests (same folder, imported by module name).
from test_internvla_n1 import EPISODES, EVERY_FRAME, write_scene
from test_streamvln import LEADING, PLAIN, write_streamvln

from vlmtrain.data.conversation import check_length
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.internvla_n1 import read_internvla_n1
from vlmtrain.data.formats.llava_json import read_llava_json
from vlmtrain.data.formats.streamvln import read_streamvln


@dataclass
class Case:
    """A dataset with one bad record; `read` returns the labels of the records it kept."""

    read: Callable[[ErrorPolicy], list[str]]
    reason: str
    file_name: str  # must appear in the error message
    record: str  # must appear in the error message
    good: list[str]  # labels that skip mode must keep


GOOD_TURNS = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]


def _llava_case(tmp: Path, bad: dict | str, reason: str, verify: bool = False) -> Case:
    """line 1 and line 3 are good, line 2 is `bad`."""
    (tmp / "img").mkdir()
    Image.new("RGB", (4, 4)).save(tmp / "img" / "ok.jpg", "JPEG")
    (tmp / "img" / "garbage.jpg").write_bytes(b"this is not a jpeg" * 8)
    good = {"image": "ok.jpg", "conversations": GOOD_TURNS}
    lines = [json.dumps(good), bad if isinstance(bad, str) else json.dumps(bad), json.dumps(good)]
    path = tmp / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def read(policy: ErrorPolicy) -> list[str]:
        return [s.record for s in read_llava_json(path, tmp / "img", policy, verify_images=verify)]

    return Case(read, reason, "train.jsonl", "line 2", ["line 1", "line 3"])


def missing_image(tmp: Path) -> Case:
    return _llava_case(tmp, {"image": "absent.jpg", "conversations": GOOD_TURNS}, "missing_image")


def unreadable_image(tmp: Path) -> Case:
    bad = {"image": "garbage.jpg", "conversations": GOOD_TURNS}
    return _llava_case(tmp, bad, "unreadable_image", verify=True)


def image_count_mismatch(tmp: Path) -> Case:
    turns = [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "x"}]
    return _llava_case(tmp, {"image": "ok.jpg", "conversations": turns}, "image_count_mismatch")


def invalid_json_line(tmp: Path) -> Case:
    return _llava_case(tmp, '{"image": "ok.jpg", "conversations": [', "bad_json")


def unknown_role(tmp: Path) -> Case:
    turns = [{"from": "narrator", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    return _llava_case(tmp, {"image": "ok.jpg", "conversations": turns}, "bad_record")


def missing_parquet_column(tmp: Path) -> Case:
    root = write_scene(tmp / "scene", drop_goal=(1,))

    def read(policy: ErrorPolicy) -> list[str]:
        return [s.record for s in read_internvla_n1(root, "r2r_125cm_0_30", policy, rules=EVERY_FRAME)]

    good = [f"scene/episode 0 t={t}" for t in range(len(EPISODES[0]["actions"]))]
    return Case(read, "missing_column", "episode_000001.parquet", "episode 1", good)


def _streamvln_case(tmp: Path, edit: Callable[[dict], None], reason: str) -> Case:
    """Episode 0 is good, episode 1 is edited after its frames were written."""
    root = write_streamvln(tmp / "R2R", [LEADING, PLAIN])
    entries = json.loads((root / "annotations.json").read_text())
    edit(entries[1])
    (root / "annotations.json").write_text(json.dumps(entries))

    def read(policy: ErrorPolicy) -> list[str]:
        return [f"episode {e.episode_index}" for e in read_streamvln(root, policy)]

    file_name = "rgb" if reason == "missing_frame" else "annotations.json"
    return Case(read, reason, file_name, "episode 1 (id 'ep_b')", ["episode 0"])


def episode_length_mismatch(tmp: Path) -> Case:
    return _streamvln_case(tmp, lambda e: e["actions"].insert(1, 1), "length_mismatch")


def unknown_action_id(tmp: Path) -> Case:
    return _streamvln_case(tmp, lambda e: e["actions"].__setitem__(2, 9), "unknown_action")


def missing_frame_dir(tmp: Path) -> Case:
    case = _streamvln_case(tmp, lambda e: None, "missing_frame")
    shutil.rmtree(tmp / "R2R" / PLAIN["video"] / "rgb")
    return case


def too_long_sample(tmp: Path) -> Case:
    lengths = {"line 1": 12, "line 2": 4097, "line 3": 4096}

    def read(policy: ErrorPolicy) -> list[str]:
        return [r for r, n in lengths.items() if check_length(n, 4096, "train.jsonl", r, policy)]

    return Case(read, "too_long", "train.jsonl", "line 2", ["line 1", "line 3"])


CASES = [
    missing_image,
    unreadable_image,
    image_count_mismatch,
    invalid_json_line,
    unknown_role,
    missing_parquet_column,
    episode_length_mismatch,
    unknown_action_id,
    missing_frame_dir,
    too_long_sample,
]


@pytest.mark.parametrize("make", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(tmp_path: Path, make: Callable[[Path], Case]) -> None:
    case = make(tmp_path)
    with pytest.raises(DataError) as info:
        case.read(ErrorPolicy("raise"))
    message = str(info.value)
    assert info.value.reason == case.reason
    assert case.file_name in message and case.record in message, message

    policy = ErrorPolicy("skip")
    assert case.read(policy) == case.good
    assert policy.summary() == {case.reason: 1}

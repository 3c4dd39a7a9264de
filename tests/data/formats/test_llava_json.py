"""LLaVA / Qwen JSON and JSONL conversations, and the shared sample checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmtrain.data.conversation import (
    ConvSample,
    ImageRef,
    check_length,
    count_placeholders,
    validate_sample,
)
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.llava_json import read_llava_json

RECORDS: list[dict[str, Any]] = [
    {"id": "one", "image": "a.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                       {"from": "gpt", "value": "A red square."}]},
    {"id": "two", "images": ["a.jpg", "sub/b.jpg"],
     "conversations": [{"from": "system", "value": "Be brief."},
                       {"from": "user", "value": "Left <image> right <image>: same?"},
                       {"from": "assistant", "value": "No."},
                       {"from": "human", "value": "Sure?"},
                       {"from": "gpt", "value": "Yes."}]},
    {"id": "no-placeholder", "image": ["sub/b.jpg", "a.jpg"],
     "conversations": [{"from": "human", "value": "Describe."},
                       {"from": "gpt", "value": "Two squares."}]},
    {"id": "text-only",
     "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
]
ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(root / "a.jpg", "JPEG")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(root / "sub" / "b.jpg", "JPEG")
    return root


def write_jsonl(path: Path, records: list[Any], blank_after_first: bool = True) -> Path:
    """One JSON object per line; a blank line after the first to check line numbering."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _images(rec: dict[str, Any]) -> list[str]:
    value = rec.get("image", rec.get("images", []))
    return [value] if isinstance(value, str) else list(value)


def check_against_records(samples: list[ConvSample], image_root: Path) -> None:
    """Every sample matches its source record: roles mapped, images absolute and in order."""
    assert len(samples) == len(RECORDS)
    for sample, rec in zip(samples, RECORDS):
        convs = rec["conversations"]
        assert [r for r, _ in sample.turns] == [ROLE[c.get("from", c.get("role"))] for c in convs]
        assert [im.path for im in sample.images] == [str(image_root / p) for p in _images(rec)]
        assert count_placeholders(sample.turns) == len(sample.images)
        for (_, text), c in zip(sample.turns, convs):
            original = c.get("value", c.get("content"))
            if "<image>" in json.dumps(rec) or not _images(rec):
                assert text == original
            else:
                assert text.endswith(original)


def test_jsonl(tmp_path: Path, image_root: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    samples = read_llava_json(path, image_root, verify_images=True)
    check_against_records(samples, image_root)
    # line numbers count the blank line (line 2) even though it holds no record
    assert [s.record for s in samples] == ["line 1", "line 3", "line 4", "line 5"]
    assert {s.source for s in samples} == {"train"}


def test_json_list(tmp_path: Path, image_root: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text("  \n" + json.dumps(RECORDS, indent=1), encoding="utf-8")
    samples = read_llava_json(path, image_root, source="llava")
    check_against_records(samples, image_root)
    assert [s.record for s in samples] == [f"item {i}" for i in range(len(RECORDS))]
    assert {s.source for s in samples} == {"llava"}


def test_missing_placeholder_prepended_to_first_human_turn(tmp_path: Path, image_root: Path) -> None:
    rec = RECORDS[2]
    (sample,) = read_llava_json(write_jsonl(tmp_path / "x.jsonl", [rec], False), image_root)
    first = rec["conversations"][0]["value"]
    assert sample.turns[0][1] == "<image>\n" * len(_images(rec)) + first


def test_absolute_image_path_kept(tmp_path: Path, image_root: Path) -> None:
    rec = dict(RECORDS[0], image=str(image_root / "a.jpg"))
    (sample,) = read_llava_json(write_jsonl(tmp_path / "x.jsonl", [rec], False), tmp_path / "elsewhere")
    assert sample.images == (ImageRef(str(image_root / "a.jpg")),)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"image": "a.jpg"}, "bad_record"),
        ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}, "bad_record"),
        ({"conversations": [{"from": "human", "value": 3}]}, "bad_record"),
        (dict(RECORDS[0], images=["a.jpg"]), "bad_record"),
        ([1, 2], "bad_record"),
        (dict(RECORDS[0], video="v.mp4"), "unsupported_record"),
        ({"conversations": [{"from": "human", "value": "question only"}]}, "no_answer"),
        (dict(RECORDS[0], image="nope.jpg"), "missing_image"),
        (dict(RECORDS[1], images=["a.jpg"]), "image_count_mismatch"),
        ('{"image": "a.jpg", ', "bad_json"),
    ],
)
def test_bad_records(tmp_path: Path, image_root: Path, bad: Any, reason: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], bad, RECORDS[3]])
    with pytest.raises(DataError) as info:
        read_llava_json(path, image_root)
    assert info.value.reason == reason and "bad.jsonl: line 3" in str(info.value)
    policy = ErrorPolicy("skip")
    kept = read_llava_json(path, image_root, policy)
    assert [s.record for s in kept] == ["line 1", "line 4"] and policy.summary() == {reason: 1}


def test_unparseable_json_list_and_missing_file(tmp_path: Path, image_root: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"conversations": []},\n{oops}]', encoding="utf-8")
    with pytest.raises(DataError, match="broken.json: line 2: bad_json"):
        read_llava_json(path, image_root)
    policy = ErrorPolicy("skip")
    assert read_llava_json(tmp_path / "absent.jsonl", image_root, policy) == []
    assert policy.summary() == {"missing_file": 1}


def test_validate_sample_options(tmp_path: Path, image_root: Path) -> None:
    turns = (("user", "<image> hi"), ("assistant", "ok"))
    missing = ConvSample("s", "line 1", turns, (ImageRef(str(tmp_path / "gone.jpg")),))
    policy = ErrorPolicy("raise")
    assert validate_sample(missing, "f.jsonl", policy, check_files=False)
    with pytest.raises(DataError, match="missing_image"):
        validate_sample(missing, "f.jsonl", policy)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00not a jpeg" * 10)
    bad = ConvSample("s", "line 1", turns, (ImageRef(str(garbage)),))
    assert validate_sample(bad, "f.jsonl", policy)  # exists; not opened unless asked
    with pytest.raises(DataError, match="unreadable_image"):
        validate_sample(bad, "f.jsonl", policy, verify_images=True)
    wrong_role = ConvSample("s", "line 1", (("bot", "x"), ("assistant", "y")))
    with pytest.raises(DataError, match="bad_record"):
        validate_sample(wrong_role, "f.jsonl", policy)


def test_check_length() -> None:
    policy = ErrorPolicy("skip")
    assert check_length(10, 10, "f.jsonl", "line 1", policy)
    assert not check_length(11, 10, "f.jsonl", "line 2", policy)
    assert policy.summary() == {"too_long": 1}
    with pytest.raises(DataError, match=r"f.jsonl: line 2: too_long: 11 tokens > max_length 10"):
        check_length(11, 10, "f.jsonl", "line 2", ErrorPolicy("raise"))

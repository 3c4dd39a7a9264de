"""InternVL meta files: sources, relative paths, repeat_time as a mixture weight, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.internvl_meta import read_internvl_meta
from vlmtrain.data.mixture import plan_mixture

# source -> (number of records, repeat_time)
SOURCES = {"caps": (4, 0.5), "vqa": (3, 2.5), "plain": (2, 1.0)}


def _record(name: str, i: int) -> dict[str, Any]:
    return {"id": f"{name}-{i}", "image": f"{name}/{i}.jpg",
            "conversations": [{"from": "human", "value": f"<image>\nQ{i}"},
                              {"from": "gpt", "value": f"A{i}"}]}


def write_meta(base: Path, sources: dict[str, tuple[int, float]] = SOURCES, extra: dict[str, Any] | None = None) -> Path:
    """Images under base/img/<name>/, annotations under base/ann/, meta at base/meta/meta.json."""
    (base / "ann").mkdir(parents=True)
    (base / "meta").mkdir()
    meta: dict[str, Any] = {}
    for name, (n, repeat) in sources.items():
        (base / "img" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i * 30, 0, 0)).save(base / "img" / name / f"{i}.jpg", "JPEG")
        lines = [json.dumps(_record(name, i)) for i in range(n)]
        (base / "ann" / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        # relative to the meta file's folder
        meta[name] = {"root": "../img/", "annotation": f"../ann/{name}.jsonl",
                      "repeat_time": repeat, "data_augment": name == "caps", "length": n}
    meta.update(extra or {})
    path = base / "meta" / "meta.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


def test_read_sources(tmp_path: Path) -> None:
    sources = read_internvl_meta(write_meta(tmp_path))
    assert [s.name for s in sources] == list(SOURCES)
    for s in sources:
        n, repeat = SOURCES[s.name]
        assert s.repeat_time == repeat and s.percent == pytest.approx(repeat * 100)
        assert s.length == n and s.data_augment == (s.name == "caps")
        assert len(s.samples) == n and {x.source for x in s.samples} == {s.name}
        assert s.root == tmp_path / "img" and s.annotation == tmp_path / "ann" / f"{s.name}.jsonl"
        assert [x.images[0].path for x in s.samples] == [
            str(tmp_path / "img" / s.name / f"{i}.jpg") for i in range(n)
        ]


def test_base_dir_override(tmp_path: Path) -> None:
    meta = write_meta(tmp_path / "a")
    with pytest.raises(DataError, match="missing_file"):
        read_internvl_meta(meta, base_dir=tmp_path)  # ../ann from tmp_path does not exist
    assert len(read_internvl_meta(meta, base_dir=tmp_path / "a" / "meta")) == len(SOURCES)


def test_repeat_time_is_the_mixture_weight(tmp_path: Path) -> None:
    sources = read_internvl_meta(write_meta(tmp_path))
    # The entries' percents, which data/sources.py scales by the configured source percent.
    percents = {s.name: s.percent for s in sources}
    assert percents == {"caps": 50.0, "vqa": 250.0, "plain": 100.0}
    by_name = {s.name: s for s in sources}
    plan = plan_mixture({s.name: len(s.samples) for s in sources}, percents, seed=3)
    mix = [by_name[name].samples[i] for name, i in plan]
    counts = Counter(s.source for s in mix)
    # 50 % of 4; 250 % of 3 = 7.5, rounded half up; 100 % of 2
    assert counts == {"caps": 2, "vqa": 8, "plain": 2}
    per_sample = Counter(s.record for s in mix if s.source == "vqa")
    assert sorted(per_sample.values()) == [2, 3, 3]  # two whole copies + 2 of 3 drawn once more
    assert len({s.record for s in mix if s.source == "caps"}) == 2  # down-sampled without repeats
    assert len({s.record for s in mix if s.source == "plain"}) == 2  # every sample once
    assert plan_mixture({s.name: len(s.samples) for s in sources}, percents, seed=3) == plan


@pytest.mark.parametrize(
    "entry",
    [
        {"root": "x", "annotation": "y", "repeat_time": "twice"},
        {"root": "x", "annotation": "y", "repeat_time": -1},
        {"root": "x"},
        {"root": "x", "annotation": "y", "data_augment": "yes"},
        {"root": "x", "annotation": "y", "length": 1.5},
        "not an object",
    ],
)
def test_bad_entries(tmp_path: Path, entry: Any) -> None:
    path = write_meta(tmp_path, extra={"broken": entry})
    with pytest.raises(DataError) as info:
        read_internvl_meta(path)
    assert info.value.reason == "bad_meta" and "meta.json: source 'broken'" in str(info.value)
    policy = ErrorPolicy("skip")
    assert [s.name for s in read_internvl_meta(path, policy)] == list(SOURCES)
    assert policy.summary() == {"bad_meta": 1}


def test_bad_meta_files(tmp_path: Path) -> None:
    policy = ErrorPolicy("skip")
    assert read_internvl_meta(tmp_path / "absent.json", policy) == []
    bad = tmp_path / "bad.json"
    bad.write_text("{oops", encoding="utf-8")
    assert read_internvl_meta(bad, policy) == []
    assert policy.summary() == {"missing_file": 1, "bad_json": 1}

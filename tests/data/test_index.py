"""The sample index (data/index.py + data/dataset.py): the same samples as the path it replaced (every
format and a mixture, clean and dirty data), rebuilt exactly when an input changes, never mistaken
for complete when a build was killed, and its skip counts reported on every start."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "formats"))  # the per-format fixture writers
from reference_path import load_data as reference_load_data  # noqa: E402
from reference_path import read_sources as reference_read_sources  # noqa: E402
from test_internvl_meta import write_meta  # noqa: E402
from test_internvla_n1 import EPISODES, NAME, write_scene  # noqa: E402
from test_streamvln import LEADING, PLAIN, write_streamvln  # noqa: E402

from vlmtrain.config import RunConfig, SourceConfig  # noqa: E402
from vlmtrain.data.dataset import load_data, open_indexes  # noqa: E402
from vlmtrain.data.errors import DataError, ErrorPolicy  # noqa: E402
from vlmtrain.data.index import META  # noqa: E402
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl  # noqa: E402
from vlmtrain.train.build import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Qwen2.5-VL (a real HF tokenizer and chat format) at 32 px frames."""
    cfg = RunConfig()
    cfg.model.family, cfg.model.frame_size = "qwen2_5_vl", 32
    cfg.model.path = str(save_tiny_qwen_vl(tmp_path_factory.mktemp("tiny") / "qwen", family="qwen2_5_vl", seed=0))
    return build_model(cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gridnav_root):
    """One data set per format; the LLaVA file holds a record of every defect the run path checks."""
    base = tmp_path_factory.mktemp("corpus")
    write_scene(base / "n1" / "scene_a")
    write_scene(base / "n1" / "scene_b", {k + 5: v for k, v in EPISODES.items()})
    write_streamvln(base / "streamvln", [LEADING, PLAIN])
    meta = write_meta(base / "meta")
    img = base / "llava" / "img"
    img.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(img / f"{i}.png")
    (img / "broken.png").write_bytes(b"not an image at all")
    ok = [{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": "red"}]
    records = [{"image": f"img/{i % 3}.png", "conversations": ok} for i in range(6)]
    dirty = records + [
        {"image": "img/broken.png", "conversations": ok},  # unreadable_image (found by the frame check)
        {"image": "img/0.png", "conversations": [{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"image": "img/1.png", "conversations": [ok[0], {"from": "gpt", "value": "word " * 400}]},  # too_long
        {"image": "img/2.png", "conversations": [ok[0], {"from": "gpt", "value": "an <image> in an answer"}]},
    ]  # the last: one image, two placeholders (image_count_mismatch)
    for name, recs in (("clean", records), ("dirty", dirty)):
        (base / "llava" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {"lerobot_vln": gridnav_root, "internvla_n1": base / "n1", "streamvln": base / "streamvln",
            "internvl_meta": meta, "llava_json": base / "llava" / "clean.jsonl",
            "dirty": base / "llava" / "dirty.jsonl"}


def _cfg(sources: list[SourceConfig], workers: int = 1, on_error: str = "raise") -> RunConfig:
    cfg = RunConfig()
    cfg.data.sources, cfg.data.num_history = sources, 3
    cfg.data.max_length, cfg.data.workers, cfg.data.on_error = 400, workers, on_error
    return cfg


def _both(cfg: RunConfig, model, root: Path):
    """(reference data, index data) of ``cfg``; each with its own policy."""
    ref_policy = ErrorPolicy(cfg.data.on_error)
    ref = reference_load_data(cfg.data, model, cfg.seed, reference_read_sources(cfg.data, ref_policy, cfg.seed),
                              ref_policy)
    new = load_data(cfg.data, model, cfg.seed, open_indexes(cfg.data, model, root), ErrorPolicy(cfg.data.on_error))
    return ref, new


def _frame_path(frames, f: int) -> str:
    return frames.paths[f]


def _assert_same(ref, new, unreadable: int = 0) -> None:
    assert len(new.samples) == len(ref.samples) > 0
    for i, r in enumerate(ref.samples):
        n = new.samples[i]
        assert n.input_ids == r.input_ids and n.labels == r.labels, i
        assert [_frame_path(new.frames, f) for f in n.frames] == [_frame_path(ref.frames, f) for f in r.frames], i
    assert new.sources == ref.sources
    assert new.skipped == ref.skipped
    # every used frame once; the reference kept unreadable frames of dropped samples in its store
    assert new.frames.shape[0] == ref.frames.shape[0] - unreadable
    assert list(new.samples.lengths) == [len(s.input_ids) for s in ref.samples]


FORMATS = [
    ("lerobot_vln", "gridnav%50"), ("internvla_n1", f"{NAME}%70"), ("streamvln", "r2r_stream"),
    ("internvl_meta", "mix%150"), ("llava_json", "colours%250"),
]


@pytest.mark.parametrize("fmt,name", FORMATS, ids=[f for f, _ in FORMATS])
def test_index_path_equals_the_reference_path(model, corpus, tmp_path, fmt, name):
    cfg = _cfg([SourceConfig(name=name, format=fmt, path=str(corpus[fmt]))])
    ref, new = _both(cfg, model, tmp_path)
    _assert_same(ref, new)


def test_a_mixture_of_every_format_equals_the_reference_path(model, corpus, tmp_path):
    cfg = _cfg([SourceConfig(name=name, format=fmt, path=str(corpus[fmt])) for fmt, name in FORMATS])
    ref, new = _both(cfg, model, tmp_path)
    _assert_same(ref, new)
    assert set(new.sources) == {"gridnav", NAME, "r2r_stream", "caps", "vqa", "plain", "colours"}


def test_dirty_data_skips_and_counts_as_the_reference_path(model, corpus, tmp_path):
    cfg = _cfg([SourceConfig(name="dirty", format="llava_json", path=str(corpus["dirty"]))], on_error="skip")
    ref, new = _both(cfg, model, tmp_path)
    _assert_same(ref, new, unreadable=1)
    assert new.skipped == {"bad_record": 1, "image_count_mismatch": 1, "too_long": 1, "unreadable_image": 1}
    assert len(new.samples) == 6


def test_dirty_data_raises_the_reference_paths_first_error(model, corpus, tmp_path):
    cfg = _cfg([SourceConfig(name="dirty", format="llava_json", path=str(corpus["dirty"]))])
    with pytest.raises(DataError) as ref:
        _both(cfg, model, tmp_path)
    with pytest.raises(DataError) as new:
        load_data(cfg.data, model, cfg.seed, open_indexes(cfg.data, model, tmp_path), ErrorPolicy("raise"))
    assert str(new.value) == str(ref.value) and "dirty.jsonl: line 8: bad_record" in str(new.value)


def test_too_long_and_unreadable_raise_as_the_reference_path(model, corpus, tmp_path):
    """Without the read-time defects, the first too-long sample stops a raise-mode run, and with a
    larger max_length the unreadable image does: too_long with the reference path's message, the
    unreadable image naming the annotation file and the record that referenced it, then the image."""
    ann = tmp_path / "late.jsonl"
    lines = Path(corpus["dirty"]).read_text().splitlines()
    ann.write_text("\n".join(lines[:7] + [lines[8]]) + "\n")  # drop the bad role and the mismatch
    for max_length, reason in ((400, "too_long"), (4000, "unreadable_image")):
        cfg = _cfg([SourceConfig(name="late", format="llava_json", path=str(ann),
                                 image_root=str(Path(corpus["dirty"]).parent))])
        cfg.data.max_length = max_length
        with pytest.raises(DataError) as ref:
            _both(cfg, model, tmp_path)
        with pytest.raises(DataError) as new:
            load_data(cfg.data, model, 0, open_indexes(cfg.data, model, tmp_path), ErrorPolicy("raise"))
        assert new.value.reason == ref.value.reason == reason
        if reason == "too_long":
            assert str(new.value) == str(ref.value)
        else:  # the reference path named only the image
            assert str(new.value) == f"{ann}: line 7: unreadable_image: image {Path(corpus['dirty']).parent / 'img' / 'broken.png'} " \
                                     "cannot be opened as an image", str(new.value)


def test_eager_frames_equal_the_reference_path(model, corpus, tmp_path):
    cfg = _cfg([SourceConfig(name="colours", format="llava_json", path=str(corpus["llava_json"]))], workers=0)
    ref, new = _both(cfg, model, tmp_path)
    assert len(new.samples) == len(ref.samples)
    for i, r in enumerate(ref.samples):  # frame ids may differ: compare the decoded pixels
        assert (new.frames[list(new.samples[i].frames)] == ref.frames[list(r.frames)]).all()


def _folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / META).is_file())


def test_unchanged_inputs_reuse_the_index_and_a_changed_annotation_or_option_rebuilds(model, corpus, tmp_path):
    ann = tmp_path / "ann.jsonl"
    ann.write_text(Path(corpus["llava_json"]).read_text())
    cfg = _cfg([SourceConfig(name="c", format="llava_json", path=str(ann), image_root=str(Path(corpus["llava_json"]).parent))])
    root = tmp_path / "index"
    (first,) = open_indexes(cfg.data, model, root)
    stamp = (first.folder / META).stat().st_mtime_ns
    (again,) = open_indexes(cfg.data, model, root)
    assert again.folder == first.folder and (again.folder / META).stat().st_mtime_ns == stamp
    with ann.open("a") as f:  # one more record: a new key, a new index with one more sample
        f.write(ann.read_text().splitlines()[0] + "\n")
    (changed,) = open_indexes(cfg.data, model, root)
    assert changed.folder != first.folder and changed.n_samples == first.n_samples + 1
    cfg.data.prompt = "{history} {current} go: {instruction}"  # not read by llava_json, but an option of the key
    (prompt,) = open_indexes(cfg.data, model, root)
    assert prompt.folder != changed.folder
    assert len(_folders(root)) == 3


def test_a_changed_vln_option_rebuilds(model, corpus, tmp_path):
    cfg = _cfg([SourceConfig(name="s", format="streamvln", path=str(corpus["streamvln"]))])
    (a,) = open_indexes(cfg.data, model, tmp_path)
    cfg.data.num_history = 2
    (b,) = open_indexes(cfg.data, model, tmp_path)
    assert a.folder != b.folder and a.sample_frames.sum() != b.sample_frames.sum()


def test_a_killed_build_leaves_nothing_mistaken_for_an_index(model, corpus, tmp_path):
    """A build SIGKILLed after its first scene leaves only a temporary folder; the next start builds
    a complete index (the killed one is never opened)."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from vlmtrain.config import RunConfig, SourceConfig
from vlmtrain.data import index_build as index
from vlmtrain.data.dataset import open_indexes
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.train.build import build_model
cfg = RunConfig()
cfg.model.family, cfg.model.frame_size = "qwen2_5_vl", 32
cfg.model.path = str(save_tiny_qwen_vl({str(tmp_path / 'qwen')!r}, family="qwen2_5_vl", seed=0))
model = build_model(cfg)
cfg.data.sources = [SourceConfig(name={NAME!r}, format="internvla_n1", path={str(corpus['internvla_n1'])!r})]
cfg.data.load_workers = 1
write = index._write_unit
def killed(*a):
    write(*a)
    os.kill(os.getpid(), signal.SIGKILL)
index._write_unit = killed
open_indexes(cfg.data, model, {str(tmp_path / 'index')!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "index"
    leftovers = [p.name for p in root.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-") and _folders(root) == []
    cfg = _cfg([SourceConfig(name=NAME, format="internvla_n1", path=str(corpus["internvla_n1"]))])
    (index,) = open_indexes(cfg.data, model, root)
    ref_policy = ErrorPolicy("raise")
    assert index.n_samples == len(reference_read_sources(cfg.data, ref_policy, 0)[0].samples) > 0


def test_skip_counts_are_stored_with_the_index_and_reported_on_every_start(model, corpus, tmp_path, caplog):
    cfg = _cfg([SourceConfig(name="dirty", format="llava_json", path=str(corpus["dirty"]))], on_error="skip")
    for attempt in range(2):  # built, then reused: the same counts, reported both times
        caplog.clear()
        with caplog.at_level(logging.INFO):
            (index,) = open_indexes(cfg.data, model, tmp_path)
            data = load_data(cfg.data, model, 0, [index], ErrorPolicy("skip"))
        assert data.skipped == {"bad_record": 1, "image_count_mismatch": 1, "too_long": 1, "unreadable_image": 1}
        assert ("built" if attempt == 0 else "reused") in caplog.text and "skipped records" in caplog.text
    assert [e["reason"] for e in index.meta["errors"]] == ["bad_record", "image_count_mismatch"]  # read-time, stored

"""Building the sample index (:mod:`vlmtrain.data.index` describes its key and layout).

**Build** (:func:`build_index`): the source is cut into units (one LeRobot / InternVLA-N1 scene root
each; an annotation file is one unit) read in ``workers`` forked processes. A unit's records are
read with the readers of ``data/formats`` under a collecting policy (every defect is kept, in
order, with its phase), validated, and encoded with the model's ``encode_conversation`` memoised by
conversation (VLN decisions repeat a few dozen conversations per episode), so a token sequence is
stored once however many samples use it. Every frame file gets a cheap signature check (its first
bytes); a file whose body is corrupt is reported by the loader worker that decodes it, naming the
file. Results stream to files in a temporary folder that is renamed into place when complete: a
killed build leaves only a ``.tmp-*`` folder, never something that looks like an index.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from vlmtrain.data.conversation import ConvSample, validate_sample
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.internvl_meta import read_internvl_meta
from vlmtrain.data.formats.internvla_n1 import parse_dataset_name, read_internvla_n1_scene
from vlmtrain.data.formats.internvla_n1_reference import N1Rules
from vlmtrain.data.formats.lerobot import VLNEpisode, iter_dataset_roots, read_lerobot_vln
from vlmtrain.data.formats.llava_json import read_llava_json
from vlmtrain.data.formats.streamvln import read_streamvln
from vlmtrain.data.frames import looks_like_image
from vlmtrain.data.index import (COLUMNS, INDEX_VERSION, META, OFFSET_COLUMNS, IndexSpec, SourceIndex,
                                 encoding_fingerprint, index_key)
from vlmtrain.data.samples import decision_turns, history_indices
from vlmtrain.models.protocol import IGNORE_INDEX, VLM, Turn

__all__ = ["build_index", "open_or_build"]

log = logging.getLogger(__name__)


# -- reading a unit -------------------------------------------------------------------------------
class _Collect(ErrorPolicy):
    """Keeps every defect in order (the phase tells a raise-mode run which came first)."""

    def __init__(self, errors: list, phase: str) -> None:
        super().__init__("skip")
        self.errors, self.phase = errors, phase

    def handle(self, err: DataError) -> None:
        self.errors.append({"phase": self.phase, "path": str(err.path), "reason": err.reason,
                            "record": err.record, "detail": err.detail})


@dataclass
class _Unit:
    """What one unit yields: columns (unit-local ids), its token sequences and frames."""

    sources: list  # (name or None, blame path, percent factor, count) of the mixture sources in order
    errors: list = field(default_factory=list)
    seq: list = field(default_factory=list)
    num_frames: list = field(default_factory=list)
    episode: list = field(default_factory=list)
    step: list = field(default_factory=list)
    source: list = field(default_factory=list)
    records: list = field(default_factory=list)
    sample_frames: list = field(default_factory=list)
    seqs: list = field(default_factory=list)  # (ids int32, labels int32, bad message or "")
    paths: list = field(default_factory=list)
    frame_ok: Any = None
    episodes: int = 0


_MODEL: Optional[VLM] = None  # the model whose chat format encodes the samples (inherited by fork)
_ENCODED: dict = {}  # conversation -> (ids, labels, bad message), per process


def _encode(turns: tuple, n_images: int) -> tuple:
    """(ids, labels, bad message) of a conversation, memoised per process."""
    key = (turns, n_images)
    hit = _ENCODED.get(key)
    if hit is None:
        try:
            enc = _MODEL.encode_conversation([Turn(r, t) for r, t in turns])
            bad = "" if enc.num_images == n_images else f"{enc.num_images} image slots but {n_images} images"
            hit = (np.asarray(enc.input_ids, dtype=np.int32), np.asarray(enc.labels, dtype=np.int32), bad)
        except ValueError as e:  # the chat format rejects the record (e.g. an <image> in an answer)
            hit = (np.zeros(0, np.int32), np.zeros(0, np.int32), str(e))
        if len(_ENCODED) > 200_000:
            _ENCODED.clear()
        _ENCODED[key] = hit
    return hit


class _UnitWriter:
    """Collects one unit's samples, assigning unit-local sequence and frame ids."""

    def __init__(self, unit: _Unit):
        self.u = unit
        self.seq_ids: dict = {}
        self.frame_ids: dict = {}

    def seq_of(self, turns: tuple, n_images: int) -> int:
        key = (turns, n_images)
        s = self.seq_ids.get(key)
        if s is None:
            s = self.seq_ids[key] = len(self.u.seqs)
            self.u.seqs.append(_encode(turns, n_images))
        return s

    def conversations(self, samples: Iterable[ConvSample], blame: str, source: int, errors: list) -> int:
        """Add validated ``samples`` (bad ones go to ``errors`` as validate-phase defects)."""
        policy, n, u = _Collect(errors, "validate"), 0, self.u
        last = None
        for s in samples:
            if not validate_sample(s, blame, policy, check_files=False):
                continue
            prefix = s.record.rsplit(" t=", 1)[0]
            if prefix != last:
                u.episodes += 1
                last = prefix
            u.seq.append(self.seq_of(s.turns, len(s.images)))
            u.num_frames.append(len(s.images))
            u.sample_frames.extend(self.frame_ids.setdefault(img.path, len(self.frame_ids)) for img in s.images)
            u.episode.append(u.episodes - 1)
            u.step.append(-1)
            u.source.append(source)
            u.records.append(s.record)
            n += 1
        u.paths = list(self.frame_ids)
        return n

    def decisions(self, episodes: Sequence[VLNEpisode], num_history: int, prompt: str) -> int:
        """Decision samples of ``episodes``, as ``sources.vln_conversations`` builds them, without a
        Python object per sample: the conversation depends only on (instruction, history count,
        action), so it is built and encoded once per distinct triple, and an episode's frame spans
        come from a template per episode length."""
        u, n = self.u, 0
        templates: dict = {}
        for ep in episodes:
            base = len(u.paths)
            root = str(ep.root)
            if os.path.isabs(root) and os.path.normpath(root) == root:  # already what abspath would give
                u.paths.extend(map(str, ep.frame_paths))
            else:
                u.paths.extend(os.path.abspath(p) for p in ep.frame_paths)
            length = ep.length
            tmpl = templates.get(length)
            if tmpl is None:
                tmpl = templates[length] = _episode_template(length, num_history)
            flat, n_hist = tmpl
            codes = n_hist * 8 + ep.targets  # (history count, action): actions are 0..3
            keys, inverse = np.unique(codes, return_inverse=True)
            instruction = ep.instructions[0]
            seqs = []
            for code in keys.tolist():
                h, action = divmod(code, 8)
                turns = tuple((x.role, x.text) for x in decision_turns(instruction, h, action, prompt))
                seqs.append(self.seq_of(turns, h + 1))
            u.seq.append(np.asarray(seqs, dtype=np.int64)[inverse.reshape(-1)])
            u.sample_frames.append(flat + base)
            u.num_frames.append(n_hist + 1)
            prefix = f"{ep.root.name}/episode {ep.episode_index} t="
            u.records.extend([prefix + str(t) for t in range(length)])
            u.step.append(np.arange(length, dtype=np.int64))
            u.episode.append(np.full(length, u.episodes, dtype=np.int64))
            u.source.append(np.zeros(length, dtype=np.int64))
            u.episodes += 1
            n += length
        return n


def _episode_template(length: int, num_history: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame offsets of every decision of an episode of ``length`` frames, end to end: history
    then current; history counts per decision)."""
    shown = [history_indices(t, num_history) + [t] for t in range(length)]
    flat = np.fromiter((f for frames in shown for f in frames), dtype=np.int64)
    return flat, np.array([len(frames) - 1 for frames in shown], dtype=np.int64)


def _read_unit(job: tuple) -> _Unit:
    """Worker: read, validate and encode one unit (``job`` = (kind, spec, argument)). The garbage
    collector pauses meanwhile: a unit allocates ~10^5 objects that all stay alive until it ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _read_unit_now(*job)
    finally:
        if enabled:
            gc.enable()


def _read_unit_now(kind: str, spec: IndexSpec, arg) -> _Unit:
    errors: list = []
    read = _Collect(errors, "read")
    if kind == "missing":
        read.handle(DataError(spec.path, "missing_file", detail=arg))
        unit = _Unit([(None, spec.path, 100.0, 0)], errors)
        _finish(unit)
        return unit
    unit = _Unit([], errors)
    w = _UnitWriter(unit)
    if kind == "lerobot_vln":
        episodes = read_lerobot_vln(arg, setting=spec.setting, policy=read, str_paths=True)
        n = w.decisions(episodes, spec.num_history, spec.prompt)
        unit.sources = [(None, spec.path, 100.0, n)]
    elif kind == "streamvln":
        n = w.decisions(read_streamvln(spec.path, read), spec.num_history, spec.prompt)
        unit.sources = [(None, spec.path, 100.0, n)]
    elif kind == "internvla_n1":
        samples = read_internvla_n1_scene(Path(arg), parse_dataset_name(spec.name), read, spec.num_history,
                                          N1Rules.from_json(spec.n1))
        unit.sources = [(None, spec.path, 100.0, w.conversations(samples, spec.path, 0, errors))]
    elif kind == "llava_json":
        root = Path(spec.image_root) if spec.image_root else Path(spec.path).parent
        samples = read_llava_json(spec.path, root, read, source=spec.name)
        unit.sources = [(None, spec.path, 100.0, w.conversations(samples, spec.path, 0, errors))]
    elif kind == "internvl_meta":
        entries = read_internvl_meta(spec.path, read)
        for i, entry in enumerate(entries):  # validated source by source, after the whole file was read
            n = w.conversations(entry.samples, str(entry.annotation), i, errors)
            unit.sources.append((entry.name, str(entry.annotation), entry.percent, n))
    else:
        raise ValueError(f"unknown data format {kind!r}")
    unit.frame_ok = np.fromiter((looks_like_image(p) for p in unit.paths), dtype=np.uint8, count=len(unit.paths))
    _finish(unit)
    return unit


def _units(spec: IndexSpec) -> list[tuple]:
    """The build jobs of ``spec``: one per scene root for the scene formats, else one."""
    if spec.fmt in ("lerobot_vln", "internvla_n1"):
        if spec.fmt == "internvla_n1":
            parse_dataset_name(spec.name)  # a bad name is a config error, before any work
        try:
            roots = iter_dataset_roots(spec.path)
        except FileNotFoundError as e:
            return [("missing", spec, str(e))]
        return [(spec.fmt, spec, str(r)) for r in roots]
    if spec.fmt in ("streamvln", "llava_json", "internvl_meta"):
        return [(spec.fmt, spec, None)]
    raise ValueError(f"unknown data format {spec.fmt!r}")


# -- writing --------------------------------------------------------------------------------------
class _ColumnFiles:
    """Append-only column files of an index under construction."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = {name: open(folder / f"{name}.bin", "wb") for name in COLUMNS}
        self.n = {name: 0 for name in COLUMNS}
        for name in OFFSET_COLUMNS:
            self.add(name, np.zeros(1, np.int64))

    def add(self, name: str, values) -> None:
        arr = np.asarray(values, dtype=COLUMNS[name])
        arr.tofile(self.files[name])
        self.n[name] += len(arr)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _blob(texts: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """utf-8 bytes of ``texts`` end to end and their lengths."""
    encoded = [t.encode("utf-8") for t in texts]
    return b"".join(encoded), np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))


def _finish(unit: _Unit) -> None:
    """In the worker: the unit's columns as arrays and blobs (cheap to pickle, little left for the
    single writing process to do)."""
    for name in ("seq", "num_frames", "episode", "step", "source", "sample_frames"):
        values = getattr(unit, name)  # ints (conversations) or arrays per episode (decisions)
        if values and isinstance(values[0], np.ndarray):
            values = np.concatenate(values)
        setattr(unit, name, np.asarray(values, dtype=np.int64))
    seqs = unit.seqs
    unit.seq_len = np.fromiter((len(x[0]) for x in seqs), dtype=np.int64, count=len(seqs))
    unit.seq_labels = np.fromiter((int((x[1][1:] != IGNORE_INDEX).sum()) for x in seqs), dtype=np.int64,
                                  count=len(seqs))
    unit.seq_bad = {i: x[2] for i, x in enumerate(seqs) if x[2]}
    unit.tokens = np.concatenate([x[0] for x in seqs]) if seqs else np.zeros(0, np.int32)
    unit.labels = np.concatenate([x[1] for x in seqs]) if seqs else np.zeros(0, np.int32)
    unit.seqs = []
    unit.records, unit.record_lens = _blob(unit.records)
    unit.paths, unit.path_lens = _blob(unit.paths)
    if unit.frame_ok is None:
        unit.frame_ok = np.zeros(0, np.uint8)


def _starts(base: int, lengths: np.ndarray) -> np.ndarray:
    """Start offsets of consecutive pieces of ``lengths``, from ``base``."""
    return base + np.cumsum(lengths) - lengths


def _write_unit(cols: _ColumnFiles, unit: _Unit, totals: dict, seq_bad: dict) -> None:
    """Append a finished ``unit`` to the columns, its local ids shifted by what came before."""
    seq0, frame0 = cols.n["seq_len"], cols.n["frame_ok"]
    cols.add("seq_start", _starts(cols.n["tokens"], unit.seq_len))
    cols.add("seq_len", unit.seq_len)
    cols.add("seq_labels", unit.seq_labels)
    bad = np.zeros(len(unit.seq_len), np.uint8)
    for i, message in unit.seq_bad.items():
        bad[i] = 1
        seq_bad[str(seq0 + i)] = message
    cols.add("seq_bad", bad)
    cols.add("tokens", unit.tokens)
    cols.add("labels", unit.labels)
    cols.add("frame_start", _starts(cols.n["sample_frames"], unit.num_frames))
    cols.add("num_frames", unit.num_frames)
    cols.add("seq", unit.seq + seq0)
    cols.add("sample_frames", unit.sample_frames + frame0)
    cols.add("episode", unit.episode + totals["episodes"])
    cols.add("step", unit.step)
    cols.add("source", unit.source)
    for blob, lens, name in ((unit.records, unit.record_lens, "records"), (unit.paths, unit.path_lens, "paths")):
        offsets = "record_offsets" if name == "records" else "path_offsets"
        cols.add(offsets, cols.n[name] + np.cumsum(lens))
        cols.files[name].write(blob)
        cols.n[name] += len(blob)
    cols.add("frame_ok", unit.frame_ok)
    totals["episodes"] += unit.episodes


def build_index(spec: IndexSpec, model: VLM, folder: Path, workers: int = 2, key: str = "") -> dict:
    """Build the index of ``spec`` for ``model``'s chat format into ``folder`` (must not exist yet):
    written into a temporary sibling and renamed into place when complete. Returns its meta. When
    another process finished the same index first, its copy is kept and this one discarded."""
    global _MODEL
    t0 = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cols = _ColumnFiles(tmp)
    jobs = _units(spec)
    totals = {"episodes": 0}
    sources: list[dict] = []
    errors: list[dict] = []
    seq_bad: dict = {}
    _MODEL = model
    _ENCODED.clear()
    try:
        for unit in _map_units(jobs, workers):
            errors.extend(unit.errors)
            start = cols.n["seq"]
            _write_unit(cols, unit, totals, seq_bad)
            for name, blame, percent, count in unit.sources:
                if sources and name is None and sources[-1]["name"] is None:  # one source over many scene units
                    sources[-1]["count"] += count
                else:
                    sources.append({"name": name, "path": blame, "percent": percent, "start": start, "count": count})
                start += count
    finally:
        cols.close()
        _MODEL = None
        _ENCODED.clear()
    if not sources:
        sources = [{"name": None, "path": spec.path, "percent": 100.0, "start": 0, "count": 0}]
    meta = {"version": INDEX_VERSION, "key": key, "spec": spec.__dict__, "sources": sources, "errors": errors,
            "seq_bad": seq_bad, "counts": dict(cols.n), "samples": cols.n["seq"], "sequences": cols.n["seq_len"],
            "frames": cols.n["frame_ok"], "episodes": totals["episodes"], "build_s": 0.0}
    meta["build_s"] = round(time.perf_counter() - t0, 3)
    (tmp / META).write_text(json.dumps(meta))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process (another node on a shared disk) completed it first: keep theirs
        if not (folder / META).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return json.loads((folder / META).read_text())
    return meta


def _map_units(jobs: list, workers: int) -> Iterator[_Unit]:
    """Units in job order, read by ``workers`` forked processes (inline for one job or worker)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_read_unit, jobs)
        return
    # Frozen first: a forked worker's garbage collector would otherwise walk every object of the
    # parent (the model, the libraries) on each full collection (measured: 2x slower builds).
    gc.freeze()
    try:
        with get_context("fork").Pool(min(workers, len(jobs))) as pool:
            yield from pool.imap(_read_unit, jobs)
    finally:
        gc.unfreeze()


def open_or_build(spec: IndexSpec, model: VLM, root: Path, workers: int = 2) -> SourceIndex:
    """The index of ``spec`` for ``model`` under ``root``: opened when one with the same key exists,
    else built first (logged either way, with its counts)."""
    key = index_key(spec, encoding_fingerprint(model), os.path.abspath(root))
    folder = Path(root) / f"{_safe(spec.name)}-{key}"
    if (folder / META).is_file():
        index = SourceIndex(folder)
        log.info("data index %s: reused (%d samples, %d frames)", folder, index.n_samples, index.n_frames)
        return index
    meta = build_index(spec, model, folder, workers, key)
    log.info("data index %s: built in %.2f s (%d samples, %d sequences, %d frames, %.0f samples/s)", folder,
             meta["build_s"], meta["samples"], meta["sequences"], meta["frames"],
             meta["samples"] / max(meta["build_s"], 1e-9))
    return SourceIndex(folder)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "source"

"""A run's training data, for every model family: source indexes -> mixture plan -> a sample table on
arrays -> frames decoded once (or by the loader workers).

Every configured source is indexed once (``data/index.py``: read, validated, tokenized in the model's
chat format, kept on disk and memory-mapped). A run then only does array work: the seeded mixture
plan (``data/mixture.py``) picks rows, ``data.max_length`` and the stored defects are applied with
the run's error policy (too long is an error or a counted skip, never a truncation), and the used
frames get dense ids. Nothing per sample lives in Python objects: :class:`SampleTable` builds a
``TokenizedSample`` from the mapped columns when a step asks for it.

``read_sources`` (every sample as a ``ConvSample``) remains for what needs the text itself: the
composed model's tokenizer is trained on it (toy-scale data by design).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from vlmtrain.config import source_name_and_percent
from vlmtrain.data.conversation import ConvSample, validate_sample
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.frames import LazyFrames, decode_frames, load_frame
from vlmtrain.data.formats.internvla_n1_reference import record_end_kinds, record_kind, rules_from_config
from vlmtrain.data.index import IndexSpec, SourceIndex
from vlmtrain.data.index_build import open_or_build
from vlmtrain.data.mixture import format_mixture_table, held_out_episodes, select_array
from vlmtrain.data.samples import TokenizedSample
from vlmtrain.data.sources import SourceSamples, read_source
from vlmtrain.models.protocol import VLM, Encoded, Turn

log = logging.getLogger(__name__)
# data.workers=0 decodes every used frame at start unless they would take more memory than this.
EAGER_FRAME_BYTES = 2 << 30


def encode_sample(model: VLM, sample: ConvSample) -> Encoded:
    """Token ids and labels of ``sample`` in the model's chat format (ValueError when the format
    rejects it, or when its image slots and images disagree)."""
    encoded = model.encode_conversation([Turn(role, text) for role, text in sample.turns])
    if encoded.num_images != len(sample.images):
        raise ValueError(f"{encoded.num_images} image slots but {len(sample.images)} images")
    return encoded


def spans(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - counts), counts) + np.arange(total)


class _Store:
    """The run's indexes as one global id space (samples and frames of index k follow index k-1's)."""

    def __init__(self, indexes: Sequence[SourceIndex]):
        self.indexes = list(indexes)
        self.sample_base = np.r_[0, np.cumsum([i.n_samples for i in indexes])].astype(np.int64)
        self.frame_base = np.r_[0, np.cumsum([i.n_frames for i in indexes])].astype(np.int64)

    def locate(self, g: int) -> tuple[SourceIndex, int, int]:
        """(index, local sample id, frame base) of global sample ``g``."""
        k = int(np.searchsorted(self.sample_base, g, side="right")) - 1
        return self.indexes[k], g - int(self.sample_base[k]), int(self.frame_base[k])

    def per_index(self, rows: np.ndarray):
        """(index, positions in ``rows``, local ids, frame base) for each index ``rows`` touch."""
        ks = np.searchsorted(self.sample_base, rows, side="right") - 1
        for k, index in enumerate(self.indexes):
            pos = np.flatnonzero(ks == k)
            if len(pos):
                yield index, pos, rows[pos] - self.sample_base[k], int(self.frame_base[k])

    def column(self, rows: np.ndarray, name: str) -> np.ndarray:
        """Per-sample column ``name`` of global samples ``rows`` (a sequence column through ``seq``)."""
        out = np.zeros(len(rows), dtype=np.int64)
        for index, pos, local, _ in self.per_index(rows):
            if name.startswith("seq_"):
                out[pos] = getattr(index, name)[index.seq[local]]
            else:
                out[pos] = getattr(index, name)[local]
        return out

    def frames_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global frame ids of every slot of ``rows``, in row order; slot counts per row)."""
        counts = self.column(rows, "num_frames")
        flat = np.zeros(int(counts.sum()), dtype=np.int64)
        offsets = np.r_[0, np.cumsum(counts)]
        for index, pos, local, fbase in self.per_index(rows):
            slots = spans(offsets[pos], counts[pos])
            flat[slots] = index.sample_frames[spans(index.frame_start[local], index.num_frames[local])] + fbase
        return flat, counts

    def frame_ok(self, frames: np.ndarray) -> np.ndarray:
        """Whether each global frame passed the index's signature check."""
        return self._frame_column(frames, lambda index, local: index.frame_ok[local].astype(bool))

    def path(self, f: int) -> str:
        """The file of global frame ``f``."""
        k = int(np.searchsorted(self.frame_base, f, side="right")) - 1
        return self.indexes[k].path(f - int(self.frame_base[k]))

    def _frame_column(self, frames: np.ndarray, get) -> np.ndarray:
        ks = np.searchsorted(self.frame_base, frames, side="right") - 1
        out = np.zeros(len(frames), dtype=bool)
        for k, index in enumerate(self.indexes):
            pos = np.flatnonzero(ks == k)
            if len(pos):
                out[pos] = get(index, frames[pos] - self.frame_base[k])
        return out


class FramePaths:
    """The files of the run's used frames, read from the memory-mapped path table on demand (what
    ``LazyFrames`` decodes in the loader workers)."""

    def __init__(self, store: _Store, used: np.ndarray):
        self.store, self.used = store, used

    def __len__(self) -> int:
        return len(self.used)

    def path_of(self, i: int) -> str:
        """The file of frame ``i`` (dense run id)."""
        return self.store.path(int(self.used[i]))

    __getitem__ = path_of


class SampleTable:
    """The planned samples (a repeated sample appears several times), on arrays.

    ``lengths`` / ``label_counts`` / ``num_frames`` are what the step plans need; ``table[i]`` is
    sample i as a ``TokenizedSample`` (its frames as dense ids into the run's frame store), read from
    the index's mapped columns when a step is built.
    """

    def __init__(self, store: _Store, rows: np.ndarray, frame_lookup: np.ndarray,
                 blames: Sequence[tuple[int, str]] = ()):
        self.store, self.rows, self.frame_lookup = store, rows, frame_lookup
        # (first global sample id, annotation file) of every source, in order: what errors name.
        self._blame_starts = np.array([b[0] for b in blames], dtype=np.int64)
        self._blames = [b[1] for b in blames]
        self.lengths = store.column(rows, "seq_len")
        self.label_counts = store.column(rows, "seq_labels")
        self.num_frames = store.column(rows, "num_frames")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> TokenizedSample:
        index, local, fbase = self.store.locate(int(self.rows[i]))
        seq = int(index.seq[local])
        a = int(index.seq_start[seq])
        b = a + int(index.seq_len[seq])
        f = int(index.frame_start[local])
        frames = self.frame_lookup[index.sample_frames[f:f + int(index.num_frames[local])] + fbase]
        return TokenizedSample(index.tokens[a:b].tolist(), index.labels[a:b].tolist(), tuple(frames.tolist()))

    def __iter__(self) -> Iterator[TokenizedSample]:
        return (self[i] for i in range(len(self)))

    def record_of(self, i: int) -> tuple[str, Any]:
        """(annotation file, record) of sample i, as data errors name them."""
        g = int(self.rows[i])
        index, local, _ = self.store.locate(g)
        k = int(np.searchsorted(self._blame_starts, g, side="right")) - 1
        return (self._blames[k] if k >= 0 else "<unknown source>"), index.record(local)

    def frame_lists(self) -> list[tuple[int, ...]]:
        """Every planned sample's frame ids (episode grouping; toy-scale opt-in)."""
        return [self[i].frames for i in range(len(self))]


@dataclass
class TrainData:
    """Everything the loop needs from the data: the planned samples, every used frame once, the ids
    collation needs and the per-source counts."""

    samples: SampleTable
    frames: torch.Tensor  # (N, 3, S, S) uint8, every image used once (LazyFrames with data.workers > 0)
    pad_id: int  # pads batches (masked and unlabelled)
    image_id: int  # the image-slot token (collation counts visual tokens with it)
    sources: dict[str, dict[str, float]]  # per source: available, percent, planned
    skipped: dict[str, int] = field(default_factory=dict)
    sample_source: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # source of each sample
    source_names: list[str] = field(default_factory=list)  # the names sample_source indexes

    def stats(self) -> dict:
        """Counts reported at start and in ``summary.json``."""
        n = len(self.samples)
        return {
            "samples": n, "frames": int(self.frames.shape[0]), "sources": self.sources,
            "mean_tokens_per_sample": round(float(np.sum(self.samples.lengths)) / max(n, 1), 2),
            "mean_images_per_sample": round(float(np.sum(self.samples.num_frames)) / max(n, 1), 3),
            "skipped": dict(self.skipped),
        }


def _planned_kinds(store: "_Store", rows: np.ndarray) -> dict[str, int]:
    """Planned samples per InternVLA-N1 reference kind (``pixel_goal`` / ``turn`` / ``stop``) among
    ``rows``, read off their records; empty for a source whose records carry no kind.

    One source's rows are all reference records or none (``record_kind`` of the first decides); their
    kinds come from the records' last bytes (``record_end_kinds``), one vectorised read of the index,
    no Python loop over tens of millions of samples at start-up."""
    if not len(rows):
        return {}
    index, local, _ = store.locate(int(rows[0]))
    if record_kind(index.record(local)) is None:
        return {}
    counts: Counter[str] = Counter()
    for index, _pos, local, _base in store.per_index(rows):
        counts.update(record_end_kinds(np.asarray(index.records)[np.asarray(index.record_offsets)[local + 1] - 1]))
    return dict(sorted(counts.items()))


def conversations_of(sources: Sequence[SourceSamples]) -> Iterator[list[Turn]]:
    """Every sample's turns, lazily (what the composed model's tokenizer trains on)."""
    for source in sources:
        for sample in source.samples:
            yield [Turn(role, text) for role, text in sample.turns]


def source_specs(dcfg) -> list[tuple[str, str, float, str, str]]:
    """(format, name, percent, path, image_root) of every configured source; ``data.root`` /
    ``data.format`` when ``data.sources`` is empty."""
    if dcfg.sources:
        return [(s.format, *source_name_and_percent(s, f"data.sources[{i}]"), s.path, s.image_root)
                for i, s in enumerate(dcfg.sources)]
    return [(dcfg.format, Path(dcfg.root).stem or "data", 100.0, dcfg.root, "")]


def read_sources(dcfg, policy: ErrorPolicy, seed: int) -> list[SourceSamples]:
    """Every configured source read as ``ConvSample``s and validated (bad ones go to ``policy``): the
    text the composed model's tokenizer is trained on. Training reads the indexes instead."""
    sources: list[SourceSamples] = []
    for fmt, name, percent, path, image_root in source_specs(dcfg):
        sources += read_source(fmt, name, path, image_root, percent, policy, seed=seed, setting=dcfg.setting,
                               num_history=dcfg.num_history, prompt=dcfg.prompt, n1=rules_from_config(dcfg))
    for s in sources:
        s.samples = [x for x in s.samples if validate_sample(x, s.path, policy, check_files=False)]
    return sources


def index_specs(dcfg) -> list[tuple[IndexSpec, float]]:
    """(index spec, configured percent) of every configured source."""
    n1 = rules_from_config(dcfg).to_json()
    return [(IndexSpec(fmt, name, str(path), image_root, dcfg.setting, dcfg.num_history, dcfg.prompt,
                       n1 if fmt == "internvla_n1" else ""), percent)
            for fmt, name, percent, path, image_root in source_specs(dcfg)]


def open_indexes(dcfg, model: VLM, root: Path) -> list[SourceIndex]:
    """The index of every configured source for ``model``, built under ``root`` when missing (by
    ``data.load_workers`` processes)."""
    return [open_or_build(spec, model, root, dcfg.load_workers) for spec, _ in index_specs(dcfg)]


@dataclass
class _Source:
    name: str
    blame: str
    percent: float
    start: int  # global sample ids start .. start + count
    count: int


def _mixture_sources(dcfg, indexes: Sequence[SourceIndex], store: _Store) -> list[_Source]:
    out = []
    for (spec, percent), index, base in zip(index_specs(dcfg), indexes, store.sample_base):
        for s in index.meta["sources"]:
            out.append(_Source(s["name"] or spec.name, s["path"], s["percent"] * percent / 100.0,
                               int(base) + s["start"], s["count"]))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"data sources have duplicate names {sorted({n for n in names if names.count(n) > 1})}")
    return out


def _replay_errors(indexes: Sequence[SourceIndex], policy: ErrorPolicy) -> None:
    """The defects the indexes stored, through the run's policy: in raise mode the first one read
    (reading comes before validation, as for one pass over the sources), else every one counted."""
    errors = [e for index in indexes for e in index.meta["errors"]]
    for phase in ("read", "validate"):
        for e in errors:
            if e["phase"] == phase:
                policy.handle(DataError(e["path"], e["reason"], e["record"], e["detail"]))


def _drop_rejected(store: _Store, sources: list[_Source], uniq: np.ndarray, max_length: int,
                   policy: ErrorPolicy) -> np.ndarray:
    """Keep-mask over the unique picked samples ``uniq``: a sample the chat format rejected
    (``bad_record``) or longer than ``max_length`` (``too_long``) goes to ``policy``, in plan order."""
    bad = store.column(uniq, "seq_bad").astype(bool)
    lengths = store.column(uniq, "seq_len")
    reject = np.flatnonzero(bad | (lengths > max_length))
    starts = np.array([s.start for s in sources], dtype=np.int64)
    for j in reject.tolist():
        index, local, _ = store.locate(int(uniq[j]))
        blame = sources[int(np.searchsorted(starts, uniq[j], side="right")) - 1].blame
        if bad[j]:
            err = DataError(blame, "bad_record", index.record(local), index.meta["seq_bad"][str(int(index.seq[local]))])
        else:
            why = f"{int(lengths[j])} tokens > max_length {max_length}"
            err = DataError(blame, "too_long", index.record(local), why)
        policy.handle(err)
    keep = np.ones(len(uniq), dtype=bool)
    keep[reject] = False
    return keep


def _drop_unreadable(store: _Store, sources: list[_Source], uniq: np.ndarray, bad_frames: np.ndarray,
                     policy: ErrorPolicy) -> np.ndarray:
    """Keep-mask over ``uniq``: samples showing a frame in ``bad_frames`` (global ids) go to ``policy``
    in plan order as ``unreadable_image``, naming the annotation file, the record that referenced the
    image and the image itself (raise mode stops at the first)."""
    if not len(bad_frames):
        return np.ones(len(uniq), dtype=bool)
    flat, counts = store.frames_of(uniq)
    hit = np.isin(flat, bad_frames)
    owner = np.repeat(np.arange(len(uniq)), counts)
    dropped = np.unique(owner[hit])
    starts = np.array([s.start for s in sources], dtype=np.int64)
    for j in dropped.tolist():
        index, local, _ = store.locate(int(uniq[j]))
        first = int(flat[np.flatnonzero(hit & (owner == j))[0]])
        blame = sources[int(np.searchsorted(starts, uniq[j], side="right")) - 1].blame
        policy.handle(DataError(blame, "unreadable_image", index.record(local),
                                f"image {store.path(first)} cannot be opened as an image"))
    keep = np.ones(len(uniq), dtype=bool)
    keep[dropped] = False
    return keep


def _used_frames(store: _Store, uniq: np.ndarray) -> np.ndarray:
    """Sorted global ids of the frames ``uniq`` show."""
    flat, _ = store.frames_of(uniq)
    mark = np.zeros(int(store.frame_base[-1]), dtype=bool)
    mark[flat] = True
    return np.flatnonzero(mark)


def _decode(paths: list[str], size: int, workers: int) -> tuple[torch.Tensor, list[int]]:
    """Decode every frame once; an unreadable file becomes a zero frame whose position is returned
    (the caller blames the records that show it). The per-file retry runs only after a failure."""
    try:
        return decode_frames(paths, size, workers), []
    except DataError:
        pass
    frames = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    bad = []
    for i, path in enumerate(paths):
        try:
            frames[i] = torch.from_numpy(load_frame(path, size).copy()).permute(2, 0, 1)
        except DataError:
            bad.append(i)
    return frames, bad


def _pick(store: _Store, source: _Source, fraction: float, seed: int, split: str) -> np.ndarray:
    """Global sample ids one source contributes to ``split``: "train" draws the mixture plan
    (``percent``) from the samples outside the held-out episodes (all of them when ``fraction`` is
    0); "val" takes every sample of the held-out episodes once (``mixture.held_out_episodes``)."""
    ids = np.arange(source.start, source.start + source.count, dtype=np.int64)
    held = held_out_episodes(store.column(ids, "episode"), fraction, seed, source.name) if fraction > 0 else None
    if split == "val":
        return ids[held] if held is not None else ids
    ids = ids[~held] if held is not None else ids
    return ids[select_array(len(ids), source.percent, seed, source.name)]


def load_data(dcfg, model: VLM, seed: int, indexes: Sequence[SourceIndex], policy: ErrorPolicy,
              split: str = "train") -> TrainData:
    """Mix the ``indexes`` (``open_indexes``) for a run of ``model``: the seeded mixture plan, the
    stored defects and ``data.max_length`` through ``policy``, the used frames decoded now
    (``data.workers=0``) or by the loader workers. Logs the mixture table and the skipped counts.

    ``split``: "train" leaves out the episodes ``data.val_fraction`` holds out, "val" is exactly those
    (every sample once); with ``data.val_fraction`` 0, "val" is every sample of the sources once."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: expected train or val")
    store = _Store(indexes)
    sources = _mixture_sources(dcfg, indexes, store)
    _replay_errors(indexes, policy)
    picks = [_pick(store, s, dcfg.val_fraction, seed, split) for s in sources]
    rows = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)  # ascending: sources in order
    uniq = rows[np.r_[True, rows[1:] != rows[:-1]]] if len(rows) else rows  # rows are sorted
    picked = len(uniq)
    uniq = uniq[_drop_rejected(store, sources, uniq, dcfg.max_length, policy)]
    used = _used_frames(store, uniq)
    unreadable = used[~store.frame_ok(used)]
    if len(unreadable):
        uniq = uniq[_drop_unreadable(store, sources, uniq, unreadable, policy)]
        used = _used_frames(store, uniq)
    height, width = model.frame_size
    if height != width:
        raise ValueError(f"frames are decoded square; the model's frame size is {model.frame_size}")
    eager_bytes = len(used) * 3 * height * height
    if dcfg.workers == 0 and eager_bytes > EAGER_FRAME_BYTES:
        log.warning("data.workers=0 would decode %d frames (%.1f GiB) into memory at start: decoding each step's "
                    "frames on the loader thread instead (data.workers > 0 decodes them in worker processes)",
                    len(used), eager_bytes / 2**30)
    if dcfg.workers > 0 or eager_bytes > EAGER_FRAME_BYTES:
        frames = LazyFrames(FramePaths(store, used), height)
    else:
        frames, bad = _decode([store.path(int(f)) for f in used], height, dcfg.load_workers)
        if bad:
            uniq = uniq[_drop_unreadable(store, sources, uniq, used[bad], policy)]
            kept = _used_frames(store, uniq)
            frames, used = frames[torch.from_numpy(np.searchsorted(used, kept))], kept
    if len(uniq) < picked:  # something was dropped (rows and uniq are both sorted)
        pos = np.minimum(np.searchsorted(uniq, rows), max(len(uniq) - 1, 0))
        rows = rows[(uniq[pos] == rows) if len(uniq) else np.zeros(len(rows), dtype=bool)]
    if not len(rows):
        raise DataError(", ".join(s.blame for s in sources), "no_usable_sample",
                        detail=f"every sample was skipped ({policy.summary()})")
    lookup = np.full(int(store.frame_base[-1]), -1, dtype=np.int32)
    lookup[used] = np.arange(len(used), dtype=np.int32)
    available = {s.name: s.count for s in sources}
    percents = {s.name: s.percent for s in sources}
    starts = np.array([s.start for s in sources], dtype=np.int64)
    sample_source = np.searchsorted(starts, rows, side="right") - 1
    per_source = np.bincount(sample_source, minlength=len(sources))
    planned = {s.name: int(c) for s, c in zip(sources, per_source) if c}
    log.info("%s mixture:\n%s", "data" if split == "train" else "validation",
             format_mixture_table(available, percents if split == "train" else {n: 100.0 for n in percents}, planned))
    if policy.skipped:
        log.warning("skipped records: %s (first: %s)", policy.summary(),
                    [e for examples in policy.examples.values() for e in examples[:1]])
    table = {n: {"available": available[n], "percent": percents[n], "planned": planned.get(n, 0)} for n in available}
    for i, s in enumerate(sources):  # InternVLA-N1 reference samples: planned samples per kind
        kinds = _planned_kinds(store, rows[sample_source == i])
        if kinds:
            table[s.name]["kinds"] = kinds
            log.info("%s: planned samples per kind %s", s.name, kinds)
    return TrainData(SampleTable(store, rows, lookup, [(s.start, s.blame) for s in sources]), frames, int(model.tokenizer.pad_token_id),
                     int(model.image_token_id), table, policy.summary(),
                     sample_source=sample_source, source_names=[s.name for s in sources])

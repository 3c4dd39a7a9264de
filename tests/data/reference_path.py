"""The data path as it was before the sample index (vlmtrain 74f2d9f ``data/dataset.py``): every
sample a Python object, tokenized one by one, frames listed in first-use order. Kept in the tests
only, as the reference the index path must reproduce (``test_index.py``)."""

from __future__ import annotations

from collections import Counter

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from vlmtrain.config import source_name_and_percent
from vlmtrain.data.conversation import ConvSample, check_length, validate_sample
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.internvla_n1_reference import SYSTEM_PROMPT, sample_kind
from vlmtrain.data.frames import LazyFrames, decode_frames, load_frame, readable
from vlmtrain.data.mixture import format_mixture_table, plan_mixture, summarize_mixture
from vlmtrain.data.samples import TokenizedSample
from vlmtrain.data.sources import SourceSamples, read_source
from vlmtrain.models.protocol import VLM, Encoded, Turn

log = logging.getLogger(__name__)


def encode_sample(model: VLM, sample: ConvSample) -> Encoded:
    """Token ids and labels of ``sample`` in the model's chat format (ValueError when the format
    rejects it, or when its image slots and images disagree)."""
    encoded = model.encode_conversation([Turn(role, text) for role, text in sample.turns])
    if encoded.num_images != len(sample.images):
        raise ValueError(f"{encoded.num_images} image slots but {len(sample.images)} images")
    return encoded


@dataclass
class TrainData:
    """Everything the loop needs from the data: the planned samples (a repeated sample appears several
    times), every used frame once, the ids collation needs and the per-source counts."""

    samples: list[TokenizedSample]
    frames: torch.Tensor  # (N, 3, S, S) uint8, every image used once (LazyFrames with data.workers > 0)
    pad_id: int  # pads batches (masked and unlabelled)
    image_id: int  # the image-slot token (collation counts visual tokens with it)
    sources: dict[str, dict[str, float]]  # per source: available, percent, planned
    skipped: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict:
        """Counts reported at start and in ``summary.json``."""
        n = len(self.samples)
        return {
            "samples": n, "frames": int(self.frames.shape[0]), "sources": self.sources,
            "mean_tokens_per_sample": round(sum(len(s.input_ids) for s in self.samples) / max(n, 1), 2),
            "mean_images_per_sample": round(sum(len(s.frames) for s in self.samples) / max(n, 1), 3),
            "skipped": dict(self.skipped),
        }


def conversations_of(sources: Sequence[SourceSamples]) -> Iterator[list[Turn]]:
    """Every sample's turns, lazily (what the composed model's tokenizer trains on; an HF family
    never reads them)."""
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
    """Every configured source read and its samples validated (bad ones go to ``policy``)."""
    sources: list[SourceSamples] = []
    for fmt, name, percent, path, image_root in source_specs(dcfg):
        sources += read_source(fmt, name, path, image_root, percent, policy, seed=seed, setting=dcfg.setting,
                               num_history=dcfg.num_history, prompt=dcfg.prompt)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data sources have duplicate names {sorted({n for n in names if names.count(n) > 1})}")
    for s in sources:  # readers check their own records; this catches what a template or builder got wrong
        s.samples = [x for x in s.samples if validate_sample(x, s.path, policy, check_files=False)]
    return sources


def load_data(dcfg, model: VLM, seed: int, sources: list[SourceSamples], policy: ErrorPolicy) -> TrainData:
    """Mix, tokenize and decode ``sources`` (from ``read_sources`` with ``policy``) for ``model`` (a
    builder: the data config stops here). Logs the mixture table and the skipped counts."""
    by_name = {s.name: s for s in sources}
    available = {s.name: len(s.samples) for s in sources}
    percents = {s.name: s.percent for s in sources}
    plan = plan_mixture(available, percents, seed)

    frame_ids: dict[str, int] = {}  # image path -> row of the frame tensor, in first-use order
    encoded: dict[tuple[str, int], Optional[TokenizedSample]] = {}
    for key in dict.fromkeys(plan):  # each picked sample once, however often the plan repeats it
        encoded[key] = _tokenize(by_name[key[0]], key[1], model, frame_ids, dcfg.max_length, policy)
    height, width = model.frame_size
    if height != width:
        raise ValueError(f"frames are decoded square; the model's frame size is {model.frame_size}")
    frames, unreadable = _decode(list(frame_ids), height, dcfg.load_workers, policy, lazy=dcfg.workers > 0)
    bad_ids = {frame_ids[p] for p in unreadable}
    for key, sample in encoded.items():
        if sample is not None and bad_ids.intersection(sample.frames):
            policy.skipped["unreadable_image"] += 1
            encoded[key] = None
    kept = [key for key in plan if encoded[key] is not None]
    if not kept:
        raise ValueError(f"no usable training sample in {[str(s.path) for s in sources]} (skipped: {policy.summary()})")
    log.info("data mixture:\n%s", format_mixture_table(available, percents, kept))
    if policy.skipped:
        log.warning("skipped records: %s (first: %s)", policy.summary(),
                    [e for examples in policy.examples.values() for e in examples[:1]])
    planned = summarize_mixture(kept)
    table = {n: {"available": available[n], "percent": percents[n], "planned": planned.get(n, 0)} for n in available}
    for name, source in by_name.items():  # InternVLA-N1 reference samples: planned per kind, from their turns
        if source.samples and source.samples[0].turns[0] == ("system", SYSTEM_PROMPT):
            kinds = Counter(sample_kind(source.samples[i]) for n, i in kept if n == name)
            table[name]["kinds"] = dict(sorted(kinds.items()))
    return TrainData([encoded[k] for k in kept], frames, int(model.tokenizer.pad_token_id), int(model.image_token_id),
                     table, policy.summary())


def _tokenize(source: SourceSamples, index: int, model: VLM, frame_ids: dict[str, int],
              max_length: int, policy: ErrorPolicy) -> Optional[TokenizedSample]:
    """One planned sample tokenized, or None when skipped (counted by ``policy``); its images get
    frame ids (first use of a path assigns the next id)."""
    sample = source.samples[index]
    try:
        encoded = encode_sample(model, sample)
    except ValueError as e:  # the chat format rejects the record (e.g. an <image> in an answer)
        policy.handle(DataError(source.path, "bad_record", sample.record, str(e)))
        return None
    if not check_length(len(encoded.input_ids), max_length, source.path, sample.record, policy):
        return None
    frames = tuple(frame_ids.setdefault(img.path, len(frame_ids)) for img in sample.images)
    return TokenizedSample(encoded.input_ids, encoded.labels, frames)


def _decode(paths: list[str], size: int, workers: int, policy: ErrorPolicy, lazy: bool = False
            ) -> tuple[torch.Tensor, set[str]]:
    """Decode every frame once; in skip mode an unreadable file becomes a zero frame whose path is
    returned (its samples are then dropped). The per-file retry runs only after a failure.
    ``lazy``: only check each file's header now; loader workers decode the frames later."""
    if lazy:
        bad = {p for p in paths if not readable(p)}
        if bad and policy.raises:
            raise DataError(sorted(bad)[0], "unreadable_image", detail="cannot be opened as an image")
        return LazyFrames(paths, size), bad
    try:
        return decode_frames(paths, size, workers), set()
    except DataError:
        if policy.raises:
            raise
    frames = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    bad = set()
    for i, path in enumerate(paths):
        try:
            frames[i] = torch.from_numpy(load_frame(path, size).copy()).permute(2, 0, 1)
        except DataError:
            bad.add(path)
    return frames, bad

"""Batches: a seeded epoch plan, O(1) seek by step, and collation with de-duplicated frames.

The plan is a pure function of (seed, epoch): batch k of a run is always the same samples, so resuming
at step k needs no replay of the loader. ``collate`` builds one micro-batch from *rows*: a row is one
sample (padded batch) or, with packing, several samples laid end to end (``data/packing.py``);
either way the batch's frames appear once in ``pixels`` however many image slots use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vlmtrain.data.errors import DataError
from vlmtrain.data.grouping import grouped_permutation
from vlmtrain.data.samples import TokenizedSample
from vlmtrain.features.fingerprint import frame_keys as content_keys
from vlmtrain.models.protocol import IGNORE_INDEX, FrameBatch


@dataclass
class Batch:
    """A padded micro-batch. Frames appear once in ``pixels`` however many slots use them."""

    input_ids: torch.Tensor  # (B, L) right-padded
    labels: torch.Tensor  # (B, L) IGNORE_INDEX on prompt and padding (and on each packed document's first token)
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    pixels: torch.Tensor  # (F, 3, H, W) uint8, unique frames
    slot_frames: torch.Tensor  # (S,) row of `pixels` for each image slot, in token order
    slot_age: torch.Tensor  # (S,) 0 = current frame, 1 = newest history frame, ...
    num_samples: int
    num_tokens: int  # real (unpadded) tokens
    num_label_tokens: int
    num_slots: int  # image slots (frames shown to the model, counting repeats)
    num_visual_tokens: int  # image-token positions (what the LM pays for the frames)
    doc_lengths: list[list[int]] = field(default_factory=list)  # per row, the length of each sample in it
    packed: bool = False  # rows hold several documents: block-diagonal attention, positions reset per document
    position_ids: Optional[torch.Tensor] = None  # packed: (B, L) 1D positions restarting per document (padding 0)
    sample_ids: tuple[int, ...] = ()  # indices into the data's sample list, in row order
    frame_keys: Optional[list[str]] = None  # content key of each `pixels` row (set when a feature cache is on)
    step_label_tokens: int = 0  # label tokens of the whole step (every rank and micro-batch): the loss normaliser
    token_ratio: float = 1.0  # max / min LLM tokens over the ranks of this step (packed plans)
    vision_ratio: float = 1.0  # max / min vision cost over the ranks of this step (packed plans)
    # Filled on the loader thread by train/step.py prepare_batch, one step ahead of the step:
    prepared: bool = False  # the fields below are set
    frames: Optional[FrameBatch] = None  # the model's encoder input of the frames the step encodes
    cached: Optional[Any] = None  # features/source.py CacheLookup: which frames the feature cache holds
    spatial_frames: Optional[torch.Tensor] = None  # a spatial branch's encoder input of the frames it encodes
    spatial_cached: Optional[Any] = None  # CacheLookup of the spatial branch's cache
    lm_positions: Optional[torch.Tensor] = None  # the model's own positions (Qwen MRoPE (3, B, L)); None: position_ids

    @property
    def computed_tokens(self) -> int:
        """Token positions the LM computes (real + padding)."""
        return int(self.input_ids.numel())

    def pin_memory(self) -> "Batch":
        """A copy whose tensors live in pinned host memory (the DataLoader calls this with pin_memory=True)."""
        def pin(v):
            return v.pin_memory() if isinstance(v, torch.Tensor) else v
        return replace(self, **{f.name: pin(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def collate(samples: Sequence[TokenizedSample], frames: torch.Tensor, pad_id: int, image_id: int) -> Batch:
    """Pad token ids, gather the batch's unique frames from ``frames`` (N, 3, H, W) and map slots to them."""
    return collate_rows([[s] for s in samples], frames, pad_id, image_id)


def collate_rows(rows: Sequence[Sequence[TokenizedSample]], frames, pad_id: int, image_id: int,
                 packed: bool = False, dedup: bool = True) -> Batch:
    """One micro-batch from ``rows`` of samples (one sample per row unless ``packed``).

    ``frames`` is the (N, 3, H, W) uint8 frame store (a tensor, or ``LazyFrames`` that decodes on
    indexing). With ``dedup`` (the default) each distinct frame id is gathered once; ``dedup=False``
    gathers one frame per image slot (the naive baseline ``vlmtrain bench --compare naive`` measures).
    Packed rows concatenate their samples; every sample's first label is IGNORE_INDEX so no target
    crosses a document boundary (``packing.pack_labels``).
    """
    if not packed and any(len(r) != 1 for r in rows):
        raise ValueError("unpacked rows hold exactly one sample each")
    doc_lengths = [[len(s.input_ids) for s in row] for row in rows]
    row_lengths = [sum(d) for d in doc_lengths]
    width = max(row_lengths)
    # Rows are assembled as Python lists and converted once (one tensor call per field, not per sample).
    id_rows, label_rows, position_rows, slot_ids, ages = [], [], [], [], []
    for row, length in zip(rows, row_lengths):
        row_ids, row_labels, row_positions = [], [], []
        for s in row:
            row_ids += s.input_ids
            # packed: a document's first target would be predicted from the previous document
            row_labels += [IGNORE_INDEX, *s.labels[1:]] if packed else s.labels
            row_positions += range(len(s.input_ids))
            slot_ids += s.frames
            ages += range(len(s.frames) - 1, -1, -1)
        pad = width - length
        id_rows.append(row_ids + [pad_id] * pad)
        label_rows.append(row_labels + [IGNORE_INDEX] * pad)
        position_rows.append(row_positions + [0] * pad)
    ids = torch.tensor(id_rows, dtype=torch.long)
    labels = torch.tensor(label_rows, dtype=torch.long)
    mask = (torch.arange(width)[None, :] < torch.tensor(row_lengths)[:, None]).long()
    positions = torch.tensor(position_rows, dtype=torch.long) if packed else None
    slot_arr = np.asarray(slot_ids, dtype=np.int64)
    if dedup:
        unique, inverse = np.unique(slot_arr, return_inverse=True)
    else:
        unique, inverse = slot_arr, np.arange(len(slot_arr))
    return Batch(
        input_ids=ids, labels=labels, attention_mask=mask,
        pixels=frames[torch.from_numpy(unique)],
        slot_frames=torch.from_numpy(inverse.reshape(-1)), slot_age=torch.tensor(ages, dtype=torch.long),
        num_samples=sum(len(r) for r in rows), num_tokens=int(sum(row_lengths)),
        num_label_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),  # targets: position 0 is never one
        num_slots=len(slot_ids), num_visual_tokens=int((ids == image_id).sum()),
        doc_lengths=doc_lengths, packed=packed, position_ids=positions,
    )


class StepBuilder:
    """Step k's micro-batches for this rank: a pure function of k (the plan decides the samples).

    Picklable state only (samples, frame store, ids), so it runs in loader worker processes as well as
    on a thread. ``frame_keys``: give every batch the content keys of its frames (what a feature cache
    is keyed by), the one place they are computed: once for the whole store at start when its frames
    are in memory, per batch when they are decoded lazily (``LazyFrames``).
    """

    def __init__(self, samples: Sequence[TokenizedSample], frames, pad_id: int, image_id: int, plan,
                 dedup: bool = True, frame_keys: bool = False):
        self.samples, self.frames, self.plan = samples, frames, plan
        self.pad_id, self.image_id, self.dedup = pad_id, image_id, dedup
        preloaded = isinstance(frames, torch.Tensor)
        self.keys = content_keys(frames) if frame_keys and preloaded else None
        self.hash_frames = frame_keys and not preloaded

    def __call__(self, k: int) -> list[Batch]:
        """The micro-batches of the run's k-th step (k from 0)."""
        spec = self.plan.step(k)
        out = []
        for micro in spec.micro:
            rows = [[self.samples[i] for i in row] for row in micro]
            try:
                batch = collate_rows(rows, self.frames, self.pad_id, self.image_id, packed=spec.packed,
                                     dedup=self.dedup)
            except DataError as e:
                raise self._blame(e, micro) from None
            batch.sample_ids = tuple(i for row in micro for i in row)
            batch.step_label_tokens = spec.label_tokens
            batch.token_ratio, batch.vision_ratio = spec.token_ratio, spec.vision_ratio
            if self.keys is not None or self.hash_frames:
                batch.frame_keys = self._keys(batch, micro)
            out.append(batch)
        return out

    def _blame(self, err: DataError, micro: Sequence[Sequence[int]]) -> DataError:
        """An image that fails when a step decodes it (``LazyFrames``: its header passed the index's
        check) named with the annotation file and record of the first sample here that shows it."""
        paths = getattr(self.frames, "paths", None)
        record_of = getattr(self.samples, "record_of", None)
        if err.record is not None or paths is None or record_of is None:
            return err
        for i in (i for row in micro for i in row):
            if any(str(paths[f]) == str(err.path) for f in self.samples[i].frames):
                blame, record = record_of(i)
                return DataError(blame, err.reason, record, f"image {err.path}: {err.detail}".rstrip(": "))
        return err

    def _keys(self, batch: Batch, micro: Sequence[Sequence[int]]) -> list[str]:
        if self.keys is None:
            return content_keys(batch.pixels)
        slot_ids = [f for row in micro for i in row for f in self.samples[i].frames]
        ids = np.unique(np.asarray(slot_ids, dtype=np.int64)) if self.dedup else slot_ids
        return [self.keys[int(f)] for f in ids]


class EpochPlan:
    """Seeded sample order: epoch e is ``permutation(seed, e)``; a run's batch k is a fixed slice of it.
    With ``groups`` and ``group_size`` > 1 the order keeps chunks of ``group_size`` samples of one group
    together (``data/grouping.py``)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, groups: Optional[np.ndarray] = None,
                 group_size: int = 0):
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} samples < batch size {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.groups, self.group_size = groups, group_size
        self.batches_per_epoch = num_samples // batch_size  # the remainder is seen in other epochs' orders
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (a pure function of seed and epoch)."""
        if self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if self.groups is not None and self.group_size > 1:
                order = grouped_permutation(self.groups, self.group_size, rng)
            else:
                order = rng.permutation(self.num_samples)
            self._cached = (epoch, order)
        return self._cached[1]

    def batch_indices(self, k: int) -> np.ndarray:
        """Sample indices of the run's k-th batch: O(1) in k, no replay."""
        epoch, pos = divmod(k, self.batches_per_epoch)
        return self.order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]

    def epoch_of(self, k: int) -> float:
        """Fractional epoch reached after ``k`` batches."""
        return k / self.batches_per_epoch

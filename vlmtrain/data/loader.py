"""Batches: a seeded epoch plan, O(1) seek by step, and collation with de-duplicated frames.

The plan is a pure function of (seed, epoch): batch k of a run is always the same samples, so resuming
at step k needs no replay of the loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vlmtrain.data.samples import IGNORE_INDEX, TokenizedSample


@dataclass
class Batch:
    """A padded micro-batch. Frames appear once in ``pixels`` however many slots use them."""

    input_ids: torch.Tensor  # (B, L) right-padded
    labels: torch.Tensor  # (B, L) IGNORE_INDEX on prompt and padding
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    pixels: torch.Tensor  # (F, 3, H, W) uint8, unique frames
    slot_frames: torch.Tensor  # (S,) row of `pixels` for each image slot, in token order
    slot_age: torch.Tensor  # (S,) 0 = current frame, 1 = newest history frame, ...
    num_samples: int
    num_tokens: int  # real (unpadded) tokens
    num_label_tokens: int
    num_slots: int  # image slots (frames shown to the model, counting repeats)
    num_visual_tokens: int  # image-token positions (what the LM pays for the frames)


def collate(samples: Sequence[TokenizedSample], frames: torch.Tensor, pad_id: int, image_id: int) -> Batch:
    """Pad token ids, gather the batch's unique frames from ``frames`` (N, 3, H, W) and map slots to them."""
    lengths = [len(s.input_ids) for s in samples]
    width = max(lengths)
    b = len(samples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    slot_ids, ages = [], []
    for i, s in enumerate(samples):
        n = lengths[i]
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
        slot_ids.extend(s.frames)
        ages.extend(range(len(s.frames) - 1, -1, -1))
    unique, inverse = np.unique(np.asarray(slot_ids, dtype=np.int64), return_inverse=True)
    return Batch(
        input_ids=ids, labels=labels, attention_mask=mask,
        pixels=frames[torch.from_numpy(unique)],
        slot_frames=torch.from_numpy(inverse.reshape(-1)), slot_age=torch.tensor(ages, dtype=torch.long),
        num_samples=b, num_tokens=int(sum(lengths)), num_label_tokens=int((labels != IGNORE_INDEX).sum()),
        num_slots=len(slot_ids), num_visual_tokens=int((ids == image_id).sum()),
    )


class EpochPlan:
    """Seeded sample order: epoch e is ``permutation(seed, e)``; a run's batch k is a fixed slice of it."""

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} samples < batch size {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = num_samples // batch_size  # the remainder is seen in other epochs' orders
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (a pure function of seed and epoch)."""
        if self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
        return self._cached[1]

    def batch_indices(self, k: int) -> np.ndarray:
        """Sample indices of the run's k-th batch: O(1) in k, no replay."""
        epoch, pos = divmod(k, self.batches_per_epoch)
        return self.order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]

    def epoch_of(self, k: int) -> float:
        """Fractional epoch reached after ``k`` batches."""
        return k / self.batches_per_epoch

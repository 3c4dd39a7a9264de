"""Builds the next steps' micro-batches in the background while the current step computes.

Two stages, both off the training thread:

1. **build** (``data.loader.StepBuilder``): the plan's samples for step k, collated, frames gathered
   (``data.workers=0``: from the frames decoded at start, on a thread) or decoded from disk in
   ``data.workers`` loader processes (a ``torch.utils.data.DataLoader`` over step indices, so the
   order is the plan's and a resumed run starts at its step without replaying anything);
2. **prepare** (``train.step.prepare_batch``, a thread in this process): feature-cache lookups, HF
   image preprocessing and Qwen MRoPE positions; then pinned memory when CUDA is present.

``next()`` returns steps strictly in order; the time it blocks is the loop's data wait.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from vlmtrain.data.errors import DataError
from vlmtrain.data.loader import Batch

# Steps built ahead of the one being trained.
PREFETCH_STEPS = 2


class _Steps(Dataset):
    """Step indices ``start .. end-1`` as a map-style dataset: item i is step ``start + i``'s micro-batches."""

    def __init__(self, build: Callable[[int], list[Batch]], start: int, end: int):
        self.build, self.start, self.end = build, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> list[Batch] | DataError:
        # A data error travels back as a value: the DataLoader would re-raise it as a RuntimeError
        # holding the worker's traceback, and the user would lose the one-line `vlmtrain: data error`.
        try:
            return self.build(self.start + i)
        except DataError as e:
            return e


def _as_is(item):
    return item


def _pin(micro: list[Batch]) -> list[Batch]:
    return [b.pin_memory() for b in micro]


class BatchPrefetcher:
    """Yields the micro-batches of plan steps ``start .. end-1`` in order, ``PREFETCH_STEPS`` ahead.

    ``build(k)``: step k's micro-batches (picklable for ``workers > 0``); ``prepare(batch)``: the
    in-process stage (may be None). With ``workers > 0``, ``prefetch_factor`` is the steps each loader
    process builds ahead (0: ``PREFETCH_STEPS``) and ``persistent_workers`` keeps the processes alive
    after their pass (both passed to the ``DataLoader``; ignored without loader processes).
    """

    def __init__(self, build: Callable[[int], list[Batch]], start: int, end: int, workers: int = 0,
                 prepare: Optional[Callable[[Batch], None]] = None, prefetch_factor: int = 0,
                 persistent_workers: bool = False):
        self.prepare = prepare
        self.pin = torch.cuda.is_available()
        self._loader: Optional[DataLoader] = None
        if workers > 0:
            # Loader processes pin nothing (pinning is per-process); the prepare thread pins.
            self._loader = DataLoader(_Steps(build, start, end), batch_size=None, shuffle=False,
                                      num_workers=workers, prefetch_factor=prefetch_factor or PREFETCH_STEPS,
                                      persistent_workers=persistent_workers, collate_fn=_as_is,
                                      multiprocessing_context="fork")
            source: Iterator[list[Batch]] = iter(self._loader)
        else:
            source = (build(k) for k in range(start, end))
        self._source = source
        self._remaining = end - start
        # One intra-op thread on the batch thread: its collation, preprocessing and positions are small
        # ops, and a second OpenMP team of torch's default size would oversubscribe the cores the
        # training step's team spins on. OpenMP's thread count is per thread: the step keeps its own.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmtrain-batches",
                                        initializer=torch.set_num_threads, initargs=(1,))
        self._queue: list[Future] = []
        for _ in range(PREFETCH_STEPS):
            self._submit()

    def _produce(self) -> list[Batch]:
        micro = next(self._source)
        if isinstance(micro, DataError):
            raise micro
        if self.prepare is not None:
            for b in micro:
                self.prepare(b)
        return _pin(micro) if self.pin else micro

    def _submit(self) -> None:
        if self._remaining > 0:
            self._queue.append(self._pool.submit(self._produce))
            self._remaining -= 1

    def next(self) -> list[Batch]:
        """The next step's micro-batches (blocks only if they are not built yet)."""
        if not self._queue:
            raise StopIteration("no more steps planned")
        batches = self._queue.pop(0).result()
        self._submit()
        return batches

    def close(self) -> None:
        """Stop the worker thread and the loader processes."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        # The DataLoader iterator owns the loader processes: drop it so they exit now, not whenever
        # this prefetcher is garbage-collected.
        self._source = iter(())
        self._loader = None

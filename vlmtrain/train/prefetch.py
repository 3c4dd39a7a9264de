"""Builds the next step's micro-batches on a background thread while the current step computes."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from vlmtrain.data.loader import Batch, EpochPlan, collate


class BatchPrefetcher:
    """Yields the micro-batches of steps ``start+1 .. end`` in order, one step ahead."""

    def __init__(self, data, plan: EpochPlan, grad_accum: int, start: int, end: int):
        self.data, self.plan, self.accum = data, plan, grad_accum
        self.k, self.end = start, end
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmtrain-batches")
        self._next: Future | None = self._submit()

    def _build(self, k: int) -> list[Batch]:
        idx = self.plan.batch_indices(k)
        size = len(idx) // self.accum
        pad, img = self.data.tokenizer.pad_token_id, self.data.sample_tokenizer.image_id
        return [collate([self.data.samples[i] for i in idx[j * size : (j + 1) * size]], self.data.frames, pad, img)
                for j in range(self.accum)]

    def _submit(self) -> Future | None:
        if self.k >= self.end:
            return None
        fut = self._pool.submit(self._build, self.k)
        self.k += 1
        return fut

    def next(self) -> list[Batch]:
        """The next step's micro-batches (blocks only if they are not built yet)."""
        if self._next is None:
            raise StopIteration("no more steps planned")
        batches = self._next.result()
        self._next = self._submit()
        return batches

    def close(self) -> None:
        """Stop the worker thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)

"""The batch thread of the prefetcher: steps in order, and one intra-op thread of its own while the
training thread keeps torch's count (two OpenMP teams on the same cores oversubscribe them)."""

from __future__ import annotations

import torch

from vlmtrain.train.prefetch import BatchPrefetcher


def test_batches_in_order_on_a_one_thread_worker():
    main_threads = torch.get_num_threads()  # what the training thread runs with by default
    seen_threads = []

    def build(k: int):
        seen_threads.append(torch.get_num_threads())
        return [k]

    prefetch = BatchPrefetcher(build, 3, 9)
    try:
        assert [prefetch.next()[0] for _ in range(6)] == [3, 4, 5, 6, 7, 8]
    finally:
        prefetch.close()
    assert seen_threads and set(seen_threads) == {1}
    assert torch.get_num_threads() == main_threads

"""The batch thread of the prefetcher: steps in order, and one intra-op thread of its own while the
training thread keeps torch's count (two OpenMP teams on the same cores oversubscribe them)."""

from __future__ import annotations

import re

import pytest
import torch

from vlmtrain.features.source import FeatureSource
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


def _step(k: int):
    return [k]


def test_loader_processes_take_prefetch_factor_and_persistent_workers():
    prefetch = BatchPrefetcher(_step, 0, 5, workers=1, prefetch_factor=3, persistent_workers=True)
    try:
        assert (prefetch._loader.prefetch_factor, prefetch._loader.persistent_workers) == (3, True)
        assert [prefetch.next()[0] for _ in range(5)] == [0, 1, 2, 3, 4]
    finally:
        prefetch.close()
    default = BatchPrefetcher(_step, 0, 2, workers=1)
    try:
        assert (default._loader.prefetch_factor, default._loader.persistent_workers) == (2, False)  # PREFETCH_STEPS
    finally:
        default.close()


def test_build_batches_passes_the_loader_keys(monkeypatch):
    """data.prefetch_factor / data.persistent_workers reach the prefetcher the run builds."""
    from types import SimpleNamespace

    import vlmtrain.train.build as build
    from vlmtrain.config import load_config

    seen = {}
    monkeypatch.setattr(build, "StepBuilder", lambda *a, **k: _step)
    monkeypatch.setattr(build, "BatchPrefetcher", lambda *a, **k: seen.update(k) or "prefetcher")
    cfg = load_config(overrides=["data.workers=2", "data.prefetch_factor=4", "data.persistent_workers=true"])
    data = SimpleNamespace(samples=[], frames=None, pad_id=0, image_id=1)
    assert build.build_batches(cfg, data, None, FeatureSource(), 0, 3, plan="plan")[0] == "prefetcher"
    assert (seen["workers"], seen["prefetch_factor"], seen["persistent_workers"]) == (2, 4, True)


@pytest.mark.parametrize("overrides, says", [
    (["data.prefetch_factor=2"], "data.prefetch_factor=2 needs loader processes: set data.workers > 0"),
    (["data.persistent_workers=true"], "data.persistent_workers=True needs loader processes"),
    (["data.workers=2", "data.prefetch_factor=-1"], "data.prefetch_factor=-1: must be >= 0"),
])
def test_loader_keys_are_validated(overrides, says):
    from vlmtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(overrides=overrides)

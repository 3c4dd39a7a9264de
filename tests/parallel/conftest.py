"""Fixtures of the multi-rank tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def deepspeed_extensions(request, tmp_path_factory) -> Path:
    """``TORCH_EXTENSIONS_DIR`` of every DeepSpeed launch in the session, so only the first one
    JIT-compiles DeepSpeed's shared-memory comm op (~60 s on 2 cores): pytest's cache directory
    (``.pytest_cache/d/deepspeed_torch_extensions``, kept across sessions), or one session temporary
    directory under ``-p no:cacheprovider``; never ``~/.cache``. Skips the test without DeepSpeed."""
    pytest.importorskip("deepspeed")
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("deepspeed_torch_extensions")) if cache else tmp_path_factory.mktemp("torch_extensions")

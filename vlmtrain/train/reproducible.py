"""Run-to-run reproducibility settings of a training process (``docs/reproducibility.md``).

By default a run on CPU is bitwise reproducible for a given machine, thread count and config: the one
operation that was not (the backward of the visual-token gather, now ``models.protocol.take_rows``)
was replaced. ``train.deterministic=true`` adds what only a global switch can give, mostly for CUDA:
deterministic kernels only (an op without one raises instead of silently varying), cuBLAS's fixed
workspace, cuDNN without autotuning, and a pinned intra-op thread count.
"""

from __future__ import annotations

import logging
import os

import torch

# cuBLAS reduces in a fixed order only with a fixed workspace; it must be set before the first handle.
CUBLAS_WORKSPACE = ":4096:8"


def configure_threads_and_determinism(threads: int, deterministic: bool, log: logging.Logger) -> int:
    """Apply ``train.threads`` (0: torch's default) and ``train.deterministic``; return the intra-op
    thread count the run uses. Call before any CUDA work (the cuBLAS workspace is read at its start)."""
    if threads > 0:
        torch.set_num_threads(threads)
    if not deterministic:
        return torch.get_num_threads()
    workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    n = torch.get_num_threads()
    torch.set_num_threads(n)  # pinned: later library calls that change it are visible as a change here
    log.info("deterministic: deterministic algorithms on, %d intra-op threads, CUBLAS_WORKSPACE_CONFIG=%s, "
             "cuDNN benchmark off", n, workspace)
    return n

"""Memory-lean next-token loss: logits only where a label is, computed in checkpointed chunks.

In VLM/VLN batches most positions are image or prompt tokens, so the full (B, L, vocab) logits that
``labels=`` in an HF forward materialises are mostly wasted; with a 150k vocabulary they are also the
largest activation of the step. Here only labelled positions go through the LM head, and above
``chunk_tokens`` labelled positions the head runs chunk by chunk under activation checkpointing, so
at most one chunk of logits is alive at a time in forward and in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmtrain.models.protocol import IGNORE_INDEX


def labelled_cross_entropy(hidden_BLD: torch.Tensor, lm_head: nn.Module, labels_BL: torch.Tensor,
                           chunk_tokens: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled targets (labels unshifted, -100 ignored).

    Equal to HF's ``ForCausalLMLoss`` mean (logits upcast to fp32 before the loss). With no labelled
    token it returns a graph-connected zero rather than NaN, so an all-prompt micro-batch cannot poison
    a step.
    """
    targets_BL = labels_BL[:, 1:].to(hidden_BLD.device)
    keep = targets_BL != IGNORE_INDEX
    hidden_TD = hidden_BLD[:, :-1][keep]
    targets_T = targets_BL[keep]
    n = targets_T.numel()
    if n == 0:
        return hidden_BLD.sum() * 0.0
    if n <= chunk_tokens:
        return F.cross_entropy(lm_head(hidden_TD).float(), targets_T)

    def chunk_sum(h_TD: torch.Tensor, t_T: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(h_TD).float(), t_T, reduction="sum")

    total = hidden_TD.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(chunk_sum, hidden_TD[start:end], targets_T[start:end], use_reentrant=False)
    return total / n

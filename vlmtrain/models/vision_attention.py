"""Qwen-VL vision towers without per-frame overheads: attention as one batched SDPA call instead of
one call per frame (or window), and the patch embedding as the matmul it is.

HF's Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers attend within each image (and, in Qwen2.5-VL,
within each window of it), described by ``cu_seqlens``. With a non-flash attention implementation
they split the tokens at ``cu_seqlens`` and call SDPA once per chunk: 4 blocks x 30 frames = 120
calls of 64 tokens per forward on the issue-11 workload, ~0.25 ms each on a CPU, more than the
attention arithmetic. With a flash implementation they make one call with ``cu_seqlens``.

:data:`BATCHED` is registered in transformers' attention registry under a name containing "flash",
so the towers take that one-call path; the function then runs the chunks as one batch of SDPA when
they all have the same length (vlmtrain resizes every frame to one ``frame_size``, so they do), and
chunk by chunk otherwise, exactly as the non-flash path. The result equals HF's SDPA path
(tests/models/test_qwen_vl.py). The Qwen adapters switch their tower to it
(:func:`enable_batched_vision_attention`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

# "flash" in the name selects the towers' cu_seqlens (one call) path: transformers' is_flash_attention_requested.
BATCHED = "vlmtrain_flash_batched_sdpa"


def batched_chunk_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, cu_seq_lens_q: Optional[torch.Tensor] = None,
                            is_causal: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """Bidirectional attention within each chunk ``cu_seq_lens_q`` of (1, H, T, D) query/key/value;
    returns (1, T, H, D) as transformers' flash functions do."""
    _, heads, total, dim = query.shape
    if cu_seq_lens_q is None:  # no chunks: one sequence
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             dropout_p=dropout, is_causal=is_causal)
        return out.transpose(1, 2), None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    if len(set(lengths)) == 1:
        n, length = len(lengths), lengths[0]

        def chunks(x: torch.Tensor) -> torch.Tensor:  # (1, H, n*L, D) -> (n, H, L, D)
            return x.view(heads, n, length, dim).transpose(0, 1)

        out = F.scaled_dot_product_attention(chunks(query), chunks(key), chunks(value), scale=scaling,
                                             dropout_p=dropout, is_causal=is_causal)
        return out.transpose(0, 1).reshape(1, heads, total, dim).transpose(1, 2), None
    outs = [F.scaled_dot_product_attention(q, k, v, scale=scaling, dropout_p=dropout, is_causal=is_causal)
            for q, k, v in zip(*(torch.split(x, lengths, dim=2) for x in (query, key, value)))]
    return torch.cat(outs, dim=2).transpose(1, 2), None


AttentionInterface.register(BATCHED, batched_chunk_attention)


def enable_batched_vision_attention(tower: nn.Module) -> bool:
    """Switch a Qwen vision tower's attention from ``sdpa`` / ``eager`` to :data:`BATCHED` (a tower
    configured for real flash attention keeps it); returns whether it changed."""
    cfg = tower.config
    if cfg._attn_implementation in ("sdpa", "eager", None):
        cfg._attn_implementation = BATCHED
        return True
    return False


class LinearPatchEmbed(nn.Module):
    """A Qwen-VL patch embedding (a ``Conv3d`` whose stride equals its kernel) computed as the linear
    map it is: each flattened (C, T, P, P) patch times the flattened kernel. CPU ``mkldnn_convolution``
    spent 18 ms per step (forward + backward) on 1 920 patches where the matmul takes ~5 ms. Keeps the
    original ``proj`` (its parameters keep their HF names, ``patch_embed.proj.weight`` / ``.bias``), so
    checkpoints, ``part_of`` and exports are unchanged."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.proj = inner.proj
        self.embed_dim = inner.embed_dim
        self.in_channels, self.temporal_patch_size, self.patch_size = (inner.in_channels, inner.temporal_patch_size,
                                                                       inner.patch_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return F.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias)


def use_linear_patch_embed(tower: nn.Module) -> bool:
    """Replace ``tower.patch_embed`` (a stride-equals-kernel Conv3d) by :class:`LinearPatchEmbed`."""
    inner = getattr(tower, "patch_embed", None)
    proj = getattr(inner, "proj", None)
    if not isinstance(proj, nn.Conv3d) or tuple(proj.stride) != tuple(proj.kernel_size) or any(proj.padding):
        return False
    tower.patch_embed = LinearPatchEmbed(inner)
    return True

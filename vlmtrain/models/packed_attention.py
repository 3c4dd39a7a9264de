"""Per-document ("varlen") attention for packed rows, for any transformers language model.

A packed row holds several documents end to end. Attention restricted to each document is usually
expressed as a (B, 1, L, L) block-diagonal mask, which makes SDPA compute every masked block anyway:
a row of 512 tokens holding five 100-token documents costs 512² score entries instead of 5 x 100².
This module instead gathers each document's queries, keys and values into a batch of its own
(documents x longest document), runs causal SDPA there and scatters the outputs back, so a packed step
costs what the same documents cost unpacked (plus two index copies per layer).

It plugs into transformers' attention registry (``AttentionInterface`` / ``AttentionMaskInterface``)
under :data:`VARLEN`; :func:`enable_varlen_attention` switches a model's language-model configs to it.
Outside a :func:`packed_documents` context the function is exactly transformers' ``sdpa`` (with
transformers' sdpa mask), so evaluation, HF-loss checks and unpacked batches are untouched.

On CUDA with flash-attn, transformers' own ``flash_attention_2`` varlen path is the faster choice;
vlmtrain leaves models configured for it alone (they keep the (B, 1, L, L) mask path).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

VARLEN = "vlmtrain_varlen"


@dataclass
class DocumentLayout:
    """Where each document of a packed (B, L) batch lies, as gather indices into the flat B*L positions."""

    index: torch.Tensor  # (N, M) flat position of document n's m-th token (0 where m is past its end)
    valid: torch.Tensor  # (N, M) bool, True on real positions of each document
    total: int  # B * L
    inverse: torch.Tensor  # (B * L,) for each flat position, its slot n * M + m in the (N, M) layout


_LAYOUT: contextvars.ContextVar[Optional[DocumentLayout]] = contextvars.ContextVar("vlmtrain_docs", default=None)


def document_layout(doc_lengths: Sequence[Sequence[int]], width: int, device: torch.device) -> DocumentLayout:
    """The layout of rows holding ``doc_lengths`` (per row) in ``width`` positions; a row's padding is
    one more document (its outputs are never labelled), so every position belongs to one document."""
    starts, lengths = [], []
    for r, row in enumerate(doc_lengths):
        pos = r * width
        for n in [*row, width - sum(row)]:
            if n > 0:
                starts.append(pos)
                lengths.append(n)
                pos += n
    longest = max(lengths)
    offsets = torch.arange(longest)
    length_N = torch.tensor(lengths)
    valid = offsets[None, :] < length_N[:, None]
    index = torch.where(valid, torch.tensor(starts)[:, None] + offsets[None, :], torch.zeros((), dtype=torch.long))
    total = len(doc_lengths) * width
    inverse = torch.empty(total, dtype=torch.long)
    inverse[index[valid]] = torch.arange(index.numel()).view_as(index)[valid]  # every position is in one document
    return DocumentLayout(index.to(device), valid.to(device), total, inverse.to(device))


@contextlib.contextmanager
def packed_documents(layout: DocumentLayout) -> Iterator[None]:
    """Within this context, :data:`VARLEN` attention attends within the documents of ``layout`` only."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def varlen_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                        scaling: Optional[float] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal attention per document inside ``packed_documents``,
    transformers' ``sdpa`` otherwise. query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, L, Hq, D)."""
    layout = _LAYOUT.get()
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, hq, length, d = query.shape
    if b * length != layout.total:
        raise ValueError(f"packed attention: the layout covers {layout.total} positions, the batch has {b * length}")

    n, m = layout.index.shape

    # index_select both ways (its backward is one index_add), not boolean-mask indexing, whose
    # nonzero + index_put cost more than the attention itself on small models.
    def per_document(x: torch.Tensor) -> torch.Tensor:  # (B, H, L, D) -> (N, H, M, D)
        flat = x.transpose(1, 2).reshape(b * length, x.shape[1], x.shape[3])
        return flat.index_select(0, layout.index.view(-1)).view(n, m, x.shape[1], x.shape[3]).transpose(1, 2)

    q, k, v = per_document(query), per_document(key), per_document(value)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != hq,
                                         dropout_p=dropout if module.training else 0.0)
    out_flat = out.transpose(1, 2).reshape(n * m, hq, d).index_select(0, layout.inverse)
    return out_flat.view(b, length, hq, d), None


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: (nothing extra for the forward, the packed-document
    layout of that forward for the recomputation). Backward recomputes a checkpointed layer outside the
    forward's :func:`packed_documents` context (and possibly on another thread), where :data:`VARLEN`
    attention would otherwise fall back to plain SDPA over the whole row."""
    layout = _LAYOUT.get()
    return contextlib.nullcontext(), (packed_documents(layout) if layout is not None else contextlib.nullcontext())


def varlen_mask(*args, **kwargs) -> Optional[torch.Tensor]:
    """The mask builder paired with :func:`varlen_sdpa_forward`: none inside ``packed_documents``
    (documents are separated by the gather), transformers' sdpa mask otherwise."""
    if _LAYOUT.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(VARLEN, varlen_sdpa_forward)
AttentionMaskInterface.register(VARLEN, varlen_mask)
assert VARLEN in ALL_MASK_ATTENTION_FUNCTIONS


def document_ids(doc_lengths: Sequence[int]) -> torch.Tensor:
    """``(L,)`` index of the document each token of a pack belongs to."""
    return torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.as_tensor(list(doc_lengths)))


def document_attention_mask(doc_lengths: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive block-diagonal causal mask ``(1, 1, L, L)``: 0 where query i may attend key j (same
    document, j <= i), ``-inf`` elsewhere.

    Every row keeps its diagonal, so no softmax row is fully masked and ``-inf`` cannot make NaNs.
    Transformers returns a 4D mask as-is (``masking_utils._preprocess_mask_arguments``), so this goes
    straight into ``attention_mask`` of an HF causal LM with eager or SDPA attention. Padding at the
    end of a pack should be passed as one more document (with IGNORE labels).
    """
    doc = document_ids(doc_lengths)
    n = doc.numel()
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.zeros(n, n, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return mask[None, None]


def packed_attention_mask(doc_lengths: Sequence[Sequence[int]], width: int, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """Additive (B, 1, L, L) mask of packed rows: :func:`document_attention_mask` per row, with the
    row's padding as one more document (so no softmax row is empty)."""
    rows = [document_attention_mask([*lengths, width - sum(lengths)], dtype) for lengths in doc_lengths]
    return torch.cat(rows).to(device)


def packed_attention(model: nn.Module, doc_lengths: Sequence[Sequence[int]], width: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[Optional[torch.Tensor], contextlib.AbstractContextManager]:
    """(attention_mask, context) under which ``forward_lm`` attends per document of packed rows: no
    mask inside :func:`packed_documents` when the model uses :data:`VARLEN` attention, else the
    (B, 1, L, L) block-diagonal mask and no context. The one place packed rows get their attention."""
    if uses_varlen(model):
        return None, packed_documents(document_layout(doc_lengths, width, device))
    return packed_attention_mask(doc_lengths, width, dtype, device), contextlib.nullcontext()


def language_model_configs(model: nn.Module) -> list:
    """The configs of the model's language model(s): every transformers module config that is not a
    vision config (text configs of HF VLMs, the composed model's causal LM)."""
    seen, out = set(), []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            continue
        seen.add(id(cfg))
        if hasattr(cfg, "num_attention_heads") and not hasattr(cfg, "vision_config") and "vision" not in type(cfg).__name__.lower():
            out.append(cfg)
    return out


def enable_varlen_attention(model: nn.Module) -> int:
    """Switch the model's language-model attention from ``sdpa`` / ``eager`` to :data:`VARLEN`; returns
    how many configs changed (others, e.g. flash-attention, are left as they are)."""
    changed = 0
    for cfg in language_model_configs(model):
        if cfg._attn_implementation in ("sdpa", "eager", None):
            cfg._attn_implementation = VARLEN
            changed += 1
    configs = language_model_configs(model)
    model.varlen_attention = bool(configs) and all(c._attn_implementation == VARLEN for c in configs)
    return changed


def uses_varlen(model: nn.Module) -> bool:
    """Whether packed batches of ``model`` go through :data:`VARLEN` attention (set by
    :func:`enable_varlen_attention` when every language-model config uses it)."""
    return bool(getattr(model, "varlen_attention", False))

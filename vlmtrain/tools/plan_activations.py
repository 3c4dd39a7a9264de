"""Activation memory of one micro-batch, from shapes: what autograd saves for backward.

An analytic model, not a measurement: the forward of each part is replayed on *symbolic* tensors
(element count, element size, requires-grad, which storage they live in), and every op saves what
PyTorch's derivative formula for it saves, only when an input needs a gradient:

- a linear layer saves its input when its weight trains (its weight when only the input needs a
  gradient: that is parameter memory, not counted); a LoRA layer saves its dropout mask, the dropout
  output (lora_A's input) and lora_A's output (rank r);
- RMSNorm (HF: fp32 upcast, ``x * rsqrt(mean(x^2))``, times the weight) saves its input and the
  rsqrt column when the input needs a gradient, and the normalised values when the weight trains;
  LayerNorm saves its input, mean and rstd;
- an activation saves its input; the gated product saves both factors;
- rotary embedding saves cos and sin (computed once per forward, shared by every layer); q and k come
  out as new tensors, while v stays a view of its projection (a fused qkv output is kept whole);
- attention (SDPA, flash / memory-efficient kernels) saves q, k, v, its output and the log-sum-exp;
  packed rows under per-document attention (``models/packed_attention.py``) gather each document into
  a batch of ``documents x longest document`` first, so q, k, v and the output have that size;
- the loss saves the labelled positions' log-softmax (fp32) and the index tensors.

Storages are counted once (a view saved by several ops, or saved by q, k and v projections alike).
Under autocast over fp32 parameters (``train.precision=bf16`` with torch backends) the residual
stream and norms stay fp32, every matmul saves its own bf16 copy of an fp32 input (autocast caches
only weight casts) and, when its input needs a gradient, the bf16 copy of its weight; PEFT runs the
LoRA branch (dropout mask included) in the LoRA weights' dtype.

With activation checkpointing of a part, the forward keeps each checkpointed layer's inputs (and
keyword tensors such as cos/sin) and nothing it saves inside; backward recomputes one layer at a
time, so the peak adds the largest single layer's own saved tensors (``recompute``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

from vlmtrain.tools.plan_arch import FROZEN, LORA, TRAINED, BlockSpec, LinearSpec, MicroShape, ModelSpec

INT64, BOOL, FP32 = 8, 1, 4


@dataclass
class _T:
    sid: int
    numel: int
    elem: int
    rg: bool
    nbytes: int
    tag: str


@dataclass
class _Graph:
    """Symbolic tensors and the storages saved for backward, with where they were made and saved."""

    autocast: bool
    param_act: int = FP32  # bytes of a matmul output (2 under bf16)
    param_bytes: int = FP32  # bytes of a parameter element
    lora_rank: int = 0
    lora_dropout: float = 0.0
    tag: str = "outside"  # where new tensors are made
    ctx: str = "outside"  # where saves happen: a checkpointed layer's tag, or "outside"
    saved: dict[int, tuple[_T, set]] = field(default_factory=dict)
    kept: dict[int, _T] = field(default_factory=dict)  # checkpointed layers' input tensors
    layers: list[str] = field(default_factory=list)  # tags of checkpointed layers
    _ids: "itertools.count" = field(default_factory=itertools.count)

    def new(self, numel: int, elem: int, rg: bool) -> _T:
        return _T(next(self._ids), int(numel), elem, bool(rg), int(numel) * elem, self.tag)

    def view(self, t: _T, numel: int) -> _T:
        return _T(t.sid, int(numel), t.elem, t.rg, t.nbytes, t.tag)

    def save(self, *ts: Optional[_T]) -> None:
        for t in ts:
            if t is not None and t.numel:
                self.saved.setdefault(t.sid, (t, set()))[1].add(self.ctx)

    def cast(self, x: _T) -> _T:
        """A matmul's input under autocast: a new bf16 copy of an fp32 tensor (not cached)."""
        return self.new(x.numel, 2, x.rg) if self.autocast and x.elem == FP32 else x

    @property
    def act(self) -> int:
        return self.param_act

    # -- ops ------------------------------------------------------------------------------------
    def weight(self, x: _T, fin: int, fout: int) -> None:
        """Under autocast a matmul whose input needs a gradient saves the bf16 copy of its weight."""
        if self.autocast and x.rg:
            self.save(self.new(fin * fout, 2, False))

    def linear(self, x: _T, rows: int, fout: int, mode: str, fin: int) -> _T:
        if mode != FROZEN or x.rg:
            self.weight(x, fin, fout)
        if mode == TRAINED:
            self.save(self.cast(x))
        elif mode == LORA:
            drop = x  # PEFT casts the branch input to the LoRA weights' dtype first
            elem = self.param_bytes
            if self.lora_dropout > 0:
                mask, drop = self.new(rows * fin, elem, False), self.new(rows * fin, elem, x.rg)
                if x.rg:
                    self.save(mask)
            self.weight(drop, fin, self.lora_rank)
            self.save(self.cast(drop))
            a = self.new(rows * self.lora_rank, self.act, True)
            self.weight(a, self.lora_rank, fout)
            self.save(a)
        return self.new(rows * fout, self.act, x.rg or mode != FROZEN)

    def rms_norm(self, x: _T, rows: int, trained: bool) -> _T:
        xf = x if x.elem == FP32 else self.new(x.numel, FP32, x.rg)
        if x.rg:
            self.save(xf, self.new(rows, FP32, True))
        h = self.new(x.numel, FP32, x.rg)
        if trained:
            self.save(h if x.elem == FP32 else self.new(x.numel, x.elem, x.rg))
        return self.new(x.numel, x.elem, x.rg or trained)

    def layer_norm(self, x: _T, rows: int, trained: bool) -> _T:
        if x.rg or trained:
            self.save(self.new(x.numel, FP32, x.rg) if self.autocast and x.elem != FP32 else x,
                      self.new(rows, FP32, False), self.new(rows, FP32, False))
        return self.new(x.numel, FP32 if self.autocast else x.elem, x.rg or trained)

    def norm(self, kind: str, x: _T, rows: int, trained: bool) -> _T:
        return (self.rms_norm if kind == "rms" else self.layer_norm)(x, rows, trained)

    def unary(self, x: _T) -> _T:
        if x.rg:
            self.save(x)
        return self.new(x.numel, x.elem, x.rg)

    def mul(self, a: _T, b: _T) -> _T:
        if b.rg:
            self.save(a)
        if a.rg:
            self.save(b)
        return self.new(a.numel, max(a.elem, b.elem), a.rg or b.rg)

    def add(self, a: _T, b: _T) -> _T:
        return self.new(a.numel, max(a.elem, b.elem), a.rg or b.rg)

    def attention(self, q: _T, k: _T, v: _T, out_numel: int, lse_numel: int, extra: tuple = ()) -> _T:
        rg = q.rg or k.rg or v.rg
        out = self.new(out_numel, q.elem, rg)
        if rg:
            self.save(q, k, v, out, self.new(lse_numel, FP32, False), *extra)
        return out


def _block(g: _Graph, b: BlockSpec, x: _T, rows: int, attn_layout: dict) -> _T:
    """One pre-norm transformer block on ``rows`` tokens; ``attn_layout`` describes the attention batch."""
    d, hd, h, kv = b.hidden, b.head_dim, b.heads, b.kv_heads
    m = b.modes
    n1 = g.norm(b.norm, x, rows, b.norm_trained)
    if b.fused_qkv:
        qkv = g.linear(n1, rows, (h + 2 * kv) * hd, m.get("qkv", FROZEN), d)
        q, k, v = g.view(qkv, rows * h * hd), g.view(qkv, rows * kv * hd), g.view(qkv, rows * kv * hd)
    else:
        q, k, v = (g.linear(n1, rows, heads * hd, m.get(role, FROZEN), d)
                   for role, heads in (("q", h), ("k", kv), ("v", kv)))
    if b.qk_norm:
        q, k = g.rms_norm(q, rows * h, b.norm_trained), g.rms_norm(k, rows * kv, b.norm_trained)
    if b.rotary:
        cos, sin = attn_layout["rotary"]
        for t in (q, k):
            if t.rg:
                g.save(cos, sin)
        q, k = g.new(q.numel, q.elem, q.rg), g.new(k.numel, k.elem, k.rg)
    slots = attn_layout["slots"]  # query positions of the attention batch (documents x longest document)
    if attn_layout.get("gather") is not None:  # per-document attention: each document gathered first
        index, inverse = attn_layout["gather"]
        if q.rg or k.rg or v.rg:
            g.save(index)
        q, k, v = (g.new(slots * heads * hd, t.elem, t.rg) for t, heads in ((q, h), (k, kv), (v, kv)))
    elif attn_layout.get("mask") is not None and kv != h:  # a masked SDPA call needs repeated k/v heads
        k, v = g.new(slots * h * hd, k.elem, k.rg), g.new(slots * h * hd, v.elem, v.rg)
    out = g.attention(q, k, v, slots * h * hd, slots * h, tuple(x for x in (attn_layout.get("mask"),) if x))
    if attn_layout.get("gather") is not None:
        if out.rg:
            g.save(attn_layout["gather"][1])
        o_in = g.new(rows * h * hd, out.elem, out.rg)
    else:
        o_in = g.view(out, rows * h * hd)
    x = g.add(x, g.linear(o_in, rows, d, m.get("o", FROZEN), h * hd))
    n2 = g.norm(b.norm, x, rows, b.norm_trained)
    i = b.intermediate
    if b.gated:
        gate = g.linear(n2, rows, i, m.get("gate", FROZEN), d)
        up = g.linear(n2, rows, i, m.get("up", FROZEN), d)
        down_in = g.mul(g.unary(gate), up)
        return g.add(x, g.linear(down_in, rows, d, m.get("down", FROZEN), i))
    f = g.unary(g.linear(n2, rows, i, m.get("fc1", FROZEN), d))
    return g.add(x, g.linear(f, rows, d, m.get("fc2", FROZEN), i))


def _stack(g: _Graph, b: BlockSpec, x: _T, rows: int, layout: dict, part: str,
           kwargs: tuple[_T, ...] = ()) -> _T:
    for i in range(b.layers):
        g.tag = f"{part}.{i}"
        if b.checkpointed:
            g.ctx = g.tag
            g.layers.append(g.tag)
            for t in (x, *kwargs):
                g.kept.setdefault(t.sid, t)
        x = _block(g, b, x, rows, layout)
        g.ctx = "outside"
    return x


def _projector(g: _Graph, linears: tuple[LinearSpec, ...], x: _T, rows: int) -> _T:
    for j, lin in enumerate(linears):
        if j:
            x = g.unary(x)  # GELU between the layers
        x = g.linear(x, rows, lin.out_features, lin.mode, lin.in_features)
    return x


def _vision(g: _Graph, s: ModelSpec, frames: int, param_bytes: int) -> _T:
    b = s.vision
    n = frames * s.patches_per_frame
    g.tag = "vision"
    pixels = g.new(n * s.patch_dim, param_bytes, False)
    x = g.linear(pixels, n, b.hidden, TRAINED if s.patch_embed_trained else FROZEN, s.patch_dim)
    layout: dict = {"slots": n}
    if b.rotary:  # Qwen-VL: 2D rotary cos/sin of every patch, and the window order gather
        layout["rotary"] = (g.new(n * b.head_dim, FP32, False), g.new(n * b.head_dim, FP32, False))
        if x.rg:
            g.save(g.new(frames * s.tokens_per_frame, INT64, False))
    x = _stack(g, b, x, n, layout, "vision", layout.get("rotary", ()))
    g.tag = "vision"
    if s.vision_post_norm is not None:
        x = g.norm(b.norm, x, n, s.vision_post_norm)
    return x


def activation_bytes(s: ModelSpec, micro: MicroShape, compute_bytes: int = FP32, param_bytes: int = FP32
                     ) -> dict[str, int]:
    """Saved-tensor bytes of one micro-batch's forward (see the module docstring), by part:
    ``vision``, ``projector``, ``llm``, ``loss``, plus ``checkpointed_inputs`` and ``recompute`` (the
    largest checkpointed layer, recomputed in backward) and ``total`` (the peak: all of them).
    ``compute_bytes``: bytes of a matmul output (2 under bf16); ``param_bytes``: of a parameter as
    the forward uses it (2 for DeepSpeed's bf16 weights or FSDP2's bf16 gathers; 4 with 2 above is
    autocast)."""
    g = _Graph(autocast=compute_bytes == 2 and param_bytes == FP32, lora_rank=s.lora_rank,
               lora_dropout=s.lora_dropout)
    g.param_act, g.param_bytes = compute_bytes, param_bytes
    d, t = s.lm.hidden, micro.tokens
    feats_rg = False
    if s.vision is not None and micro.projector_frames:
        rows = micro.projector_frames * s.tokens_per_frame
        if micro.frames:
            x = _vision(g, s, micro.frames, param_bytes)
        else:  # a split feature cache: vision features read from disk
            x = g.new(micro.projector_frames * s.patches_per_frame * s.vision.hidden, FP32, False)
        g.tag = "projector"
        if s.merge_norm is not None:
            x = g.norm(s.vision.norm, x, micro.projector_frames * s.patches_per_frame, s.merge_norm)
        else:  # pixel shuffle: a reshaped copy the first linear layer reads
            x = g.new(x.numel, x.elem, x.rg)
        x = _projector(g, s.projector, x, rows)
        if s.merge_norm is not None and x.rg:  # the window order undone: a gather with its index
            g.save(g.new(rows, INT64, False))
        feats_rg = x.rg or s.frame_age_trained
    g.tag = "llm"
    embeds_rg = s.embed_trained
    if embeds_rg:
        g.save(g.new(t, INT64, False))  # token ids (embedding backward)
    if micro.visual_tokens and (embeds_rg or feats_rg):
        g.save(g.new(t, BOOL, False), g.new(micro.visual_tokens, INT64, False))  # scatter mask, slot index
    x = g.new(t * d, param_bytes, embeds_rg or feats_rg)
    b = s.lm
    docs = [[n for n in row if n] + ([micro.width - sum(row)] if micro.width > sum(row) else [])
            for row in micro.row_docs]
    rotary = (g.new(t * b.head_dim, param_bytes, False), g.new(t * b.head_dim, param_bytes, False))
    layout: dict = {"rotary": rotary}
    if micro.varlen:
        n_docs, longest = sum(len(r) for r in docs), max(n for r in docs for n in r)
        layout.update(slots=n_docs * longest, gather=(g.new(n_docs * longest, INT64, False), g.new(t, INT64, False)))
    else:
        padded = any(len(r) > 1 or sum(r) < micro.width for r in micro.row_docs) or len(docs) > 1
        layout.update(slots=t, mask=g.new(len(docs) * micro.width ** 2, BOOL, False) if padded else None)
    x = _stack(g, b, x, t, layout, "llm", rotary)
    g.tag = "llm"
    x = g.norm(b.norm, x, t, s.final_norm_trained)
    g.tag = "loss"
    if micro.labels and (x.rg or s.head_trained):
        if x.rg:
            g.save(g.new(t - len(docs), BOOL, False))  # the labelled-position mask
        hidden = g.new(micro.labels * d, x.elem, x.rg)
        g.linear(hidden, micro.labels, s.vocab, TRAINED if s.head_trained else FROZEN, d)
        g.save(g.new(min(micro.labels, 4096) * s.vocab, FP32, False), g.new(micro.labels, INT64, False))
    return _summary(g)


def _summary(g: _Graph) -> dict[str, int]:
    out = dict.fromkeys(("vision", "projector", "llm", "loss"), 0)
    outside = {sid for sid, (_, ctxs) in g.saved.items() if "outside" in ctxs}
    for sid in outside:
        tensor = g.saved[sid][0]
        out[tensor.tag.split(".")[0]] += tensor.nbytes
    kept = sum(tensor.nbytes for sid, tensor in g.kept.items() if sid not in outside)
    per_layer = {tag: 0 for tag in g.layers}
    for sid, (tensor, ctxs) in g.saved.items():
        if sid not in outside and sid not in g.kept and tensor.tag in ctxs and tensor.tag in per_layer:
            per_layer[tensor.tag] += tensor.nbytes
    out["checkpointed_inputs"] = kept
    out["recompute"] = max(per_layer.values(), default=0)
    out["total"] = sum(out.values())
    return out

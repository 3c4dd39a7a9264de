"""One optimizer step over gradient-accumulation micro-batches, timed by phase.

A micro-batch goes: image features (``features/source.py``: the unique frames once, or the cache) ->
``embed`` -> ``forward_lm`` (padded rows, or packed rows under a block-diagonal document mask with
positions reset per document) -> backward. The loss is normalised by the step's label tokens over
every rank and micro-batch, so the gradient equals that of one big batch however it is split.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Optional, Sequence, Union

import torch

from vlmtrain.data.loader import Batch
from vlmtrain.features.source import FeatureSource
from vlmtrain.models.packed_attention import packed_attention
from vlmtrain.models.protocol import VLM
from vlmtrain.models.spatial import spatial_branch
from vlmtrain.parallel.deepspeed_engine import DeepSpeedEngine
from vlmtrain.parallel.init import all_reduce_sum
from vlmtrain.parallel.parallelize import accumulation_context

PHASES = ("data", "vision", "lm_forward", "backward", "optimizer")


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast when asked, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PhaseTimer:
    """Wall time per phase (``perf_counter``). With ``sync`` (benchmarks on CUDA) each phase boundary
    waits for the device, so GPU work is charged to the phase that queued it."""

    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last pop."""
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def prepare_batch(model: VLM, batch: Batch, source: FeatureSource) -> Batch:
    """Loader-thread work that needs the model but no gradients, done once per batch: the feature
    cache lookup and the model's frame preprocessing (``FeatureSource.prepare``) and the model's own
    positions (Qwen MRoPE), into the batch's typed fields. Returns the batch."""
    if batch.prepared:
        return batch
    source.prepare(model, batch)
    if batch.packed:
        batch.lm_positions = model.packed_position_ids(batch.input_ids, batch.doc_lengths)
    else:
        batch.lm_positions = model.position_ids(batch.input_ids, batch.attention_mask)
    batch.prepared = True
    return batch


def micro_loss(model: VLM, batch: Batch, device: torch.device, source: FeatureSource,
               timer: Optional[PhaseTimer] = None) -> tuple[torch.Tensor, int]:
    """Mean loss of one micro-batch, and the frames its encoder ran on. A micro-batch without frames
    runs the encoder on one black frame whose features no slot uses (``FeatureSource.features``), so
    its graph has the shape of one with frames, as every data-parallel backend needs."""
    timer = timer or PhaseTimer()
    prepare_batch(model, batch, source)  # a no-op for batches the prefetcher prepared
    with timer("vision"):
        features, encoded = source.features(model, batch, device)
    with timer("lm_forward"):
        loss = lm_loss(model, batch, features, device)
    return loss, encoded


def lm_loss(model: VLM, batch: Batch, features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The language-model half of a prepared micro-batch: ``features`` (F, K, D) of its unique frames
    fill the image slots (``embed``), then ``forward_lm`` on padded rows (padding mask) or packed rows
    (per-document attention and positions). ``vlmtrain bench`` times this alone, on features held in
    memory, as the LM-only floor."""
    ids = batch.input_ids.to(device, non_blocking=True)
    embeds = model.embed(ids, features, batch.slot_frames.to(device, non_blocking=True),
                         batch.slot_age.to(device, non_blocking=True))
    labels = batch.labels.to(device, non_blocking=True)
    positions = batch.lm_positions if batch.lm_positions is not None else batch.position_ids
    positions = positions.to(device, non_blocking=True) if positions is not None else None
    if not batch.packed:
        return model.forward_lm(embeds, labels, attention_mask=batch.attention_mask.to(device), position_ids=positions)
    mask, context = packed_attention(model, batch.doc_lengths, ids.shape[1], embeds.dtype, device)
    with context:
        return model.forward_lm(embeds, labels, attention_mask=mask, position_ids=positions)


def batch_loss(model: VLM, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean loss of one micro-batch without a feature cache: encode its unique frames once, fill the
    slots, run the LM."""
    return micro_loss(model, batch, device, FeatureSource())[0]


def train_step(
    model: VLM, micro_batches: Sequence[Batch], optimizer, scheduler, grad_clip: float, precision: str,
    device: torch.device, source: Optional[FeatureSource] = None, timer: Optional[PhaseTimer] = None,
    world_size: int = 1, parallel: Optional[Union[torch.nn.Module, DeepSpeedEngine]] = None,
    inject_nonfinite: bool = False,
) -> dict[str, float]:
    """Forward/backward every micro-batch, clip, step; the loss is normalised by the step's label tokens.

    Each micro-batch's mean loss is weighted by its share of the step's label tokens counted over every
    rank and micro-batch (``Batch.step_label_tokens``, known from the plan without communication),
    times ``world_size`` because data parallelism averages gradients over ranks. The gradient thus
    equals that of one big batch however the samples are split.

    ``parallel``: what ``dist.parallelize`` wrapped around ``model`` (DDP / FSDP2 / a
    :class:`DeepSpeedEngine`). Each micro-batch's loss then runs as its forward (the wrapper's hooks
    sync and gather), DDP all-reduces gradients only in the last micro-batch's backward (``no_sync``
    before), and the returned loss is the step's loss over all ranks. A DeepSpeed engine runs the
    backward of each weighted loss (told which is the step's last) and the optimizer step: its own
    clipping (``gradient_clipping`` = ``grad_clip``), the optimizer and scheduler it was built with,
    zeroing; its wall-clock breakdown, when on, is returned as ``deepspeed/*_ms``.

    **Non-finite steps.** When the step's loss (summed over ranks) or its global gradient norm is
    NaN/Inf, the optimizer does not step (the gradients are dropped, the schedule still advances) and
    the result says ``nonfinite``; both values are global, so every rank decides the same without
    another collective. A DeepSpeed engine steps inside ``engine.step()``, so there the update has
    already happened and ``updated`` is True: the caller must stop. ``inject_nonfinite`` multiplies
    the losses by NaN before backward (fault injection: ``VLMTRAIN_FAULT_NONFINITE``, tests).
    """
    engine = parallel if isinstance(parallel, DeepSpeedEngine) else None
    forward = parallel if parallel is not None else (lambda fn, *args, **kw: fn(model, *args, **kw))
    source = source or FeatureSource()
    timer = timer or PhaseTimer()
    total_labels = micro_batches[0].step_label_tokens or sum(b.num_label_tokens for b in micro_batches)
    loss_sum, encoded = 0.0, 0
    for i, b in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with accumulation_context(parallel if parallel is not None else model, last):
            with autocast_context(precision, device):
                loss, n = forward(micro_loss, b, device, source, timer)
            if inject_nonfinite:
                loss = loss * float("nan")
            encoded += n
            weight = b.num_label_tokens * world_size / max(total_labels, 1)
            with timer("backward"):
                if engine is not None:
                    engine.backward(loss * weight, last_micro=last)
                else:
                    (loss * weight).backward()
        loss_sum += float(loss.detach()) * weight
    loss = loss_sum / world_size  # this rank's share of the step's loss
    loss = all_reduce_sum(loss) if parallel is not None else loss
    with timer("optimizer"):
        if engine is not None:
            grad_norm = engine.step()
            finite, updated = math.isfinite(loss) and math.isfinite(grad_norm), True
        else:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            max_norm = grad_clip if grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
            updated = finite
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    out = {"loss": loss, "grad_norm": grad_norm, "frames_encoded": encoded, "nonfinite": not finite,
           "updated": updated}
    if spatial_branch(model) is not None:
        out["spatial_encoded"] = source.pop_spatial_encoded()
    return {**out, **engine.timings()} if engine is not None else out

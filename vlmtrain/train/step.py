"""One optimizer step over gradient-accumulation micro-batches."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from vlmtrain.data.loader import Batch
from vlmtrain.models.hf_base import HFVLMAdapter


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast when asked, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss(model, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean loss of one micro-batch: encode its unique frames once, fill the slots, run the LM."""
    if isinstance(model, HFVLMAdapter):
        return adapter_batch_loss(model, batch, device)
    features = model.encode_images(batch.pixels.to(device, non_blocking=True))
    embeds = model.embed(batch.input_ids.to(device), features, batch.slot_frames.to(device), batch.slot_age.to(device))
    return model.forward_lm(embeds, batch.labels.to(device), attention_mask=batch.attention_mask.to(device))


def adapter_batch_loss(model: HFVLMAdapter, batch: Batch, device: torch.device) -> torch.Tensor:
    """``batch_loss`` of an HF adapter: the batch's unique uint8 frames go through the family's own
    preprocessing, are encoded once, fill their slots; Qwen-VL adds its MRoPE position ids."""
    frames = model.prepare_frames(batch.pixels).to(device, non_blocking=True)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    slots = batch.slot_frames.to(device)
    embeds = model.embed(ids, model.encode_images(frames), slots)
    positions = model.position_ids(ids, mask, frames, slots)
    return model.forward_lm(embeds, batch.labels.to(device), attention_mask=mask, position_ids=positions)


def train_step(
    model, micro_batches: Sequence[Batch], optimizer, scheduler, grad_clip: float, precision: str,
    device: torch.device,
) -> dict[str, float]:
    """Forward/backward every micro-batch, clip, step; the loss is normalised by the step's label tokens.

    Each micro-batch's mean loss is weighted by its share of the step's label tokens, so the gradient
    equals that of one big batch however the samples are split.
    """
    total_labels = sum(b.num_label_tokens for b in micro_batches)
    loss_sum = 0.0
    for b in micro_batches:
        with autocast_context(precision, device):
            loss = batch_loss(model, b, device)
        weight = b.num_label_tokens / total_labels
        (loss * weight).backward()
        loss_sum += float(loss.detach()) * weight
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "grad_norm": grad_norm}

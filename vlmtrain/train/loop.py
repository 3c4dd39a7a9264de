"""``train(cfg)``: the whole run, top to bottom."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from vlmtrain.config import RunConfig, save_config
from vlmtrain.data.conv_data import ConvData, load_conv_data
from vlmtrain.data.loader import EpochPlan
from vlmtrain.data.tokenizer import load_tokenizer, save_tokenizer
from vlmtrain.data.vln import VLNData, load_vln_data
from vlmtrain.dist.checkpointing import apply_activation_checkpointing
from vlmtrain.metrics.meter import StepMeter
from vlmtrain.metrics.progress import Progress
from vlmtrain.metrics.sinks import JsonlSink
from vlmtrain.models.composed import build_composed_vlm
from vlmtrain.models.export import export_merged
from vlmtrain.models.hf_base import HFVLMAdapter
from vlmtrain.models.lora import LoraSettings, apply_lora, format_trainable
from vlmtrain.models.registry import load_adapter
from vlmtrain.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vlmtrain.train.optim import apply_freeze, build_optimizer, build_scheduler, trainable_counts
from vlmtrain.train.prefetch import BatchPrefetcher
from vlmtrain.train.step import train_step

log = logging.getLogger("vlmtrain")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_tokens(cfg: RunConfig) -> tuple[int, int]:
    """Visual tokens of the current frame (after pixel shuffle) and of a (pooled) history frame."""
    k = (cfg.data.image_size // cfg.model.patch_size // cfg.model.pixel_shuffle) ** 2
    kh = cfg.model.history_tokens
    return k, (kh if 0 < kh < k else k)


def lora_settings(mcfg) -> LoraSettings:
    """``model.lora_*`` as LoRA settings (an empty target list means the default targets)."""
    return LoraSettings(rank=mcfg.lora_rank, alpha=mcfg.lora_alpha, dropout=mcfg.lora_dropout,
                        target_modules=tuple(mcfg.lora_targets) or None, parts=tuple(mcfg.lora_parts))


def build_model(cfg: RunConfig, data: Optional[VLNData] = None) -> nn.Module:
    """The model ready to train: the composed VLM sized to the data's tokenizer, or the HF VLM in
    ``model.path`` behind its adapter; then freezing, LoRA (HF families) and activation checkpointing.

    With LoRA, the parts in ``model.lora_parts`` are frozen first, so they train only through their
    LoRA weights (not through full-rank embeddings and norms as well); other parts follow the
    ``train.freeze_*`` flags. ``data`` is needed for the composed model only.
    """
    m = cfg.model
    if m.family == "composed":
        if data is None:
            raise ValueError("the composed model is sized to its data's tokenizer: pass the data")
        tok = data.tokenizer
        model = build_composed_vlm(m, cfg.data.image_size, len(tok), tok.convert_tokens_to_ids("<image>"),
                                   tok.pad_token_id, max_frame_slots=cfg.data.num_history + 1)
        apply_freeze(model, cfg.train)
    else:
        model = load_adapter(m.family, m.path, m.frame_size or None)
        apply_freeze(model, cfg.train, also_frozen=m.lora_parts if m.lora else ())
        if m.lora:
            log.info("LoRA: %s", format_trainable(apply_lora(model, lora_settings(m))))
    apply_activation_checkpointing(model, cfg.train.grad_checkpointing)
    return model


def build_model_and_data(cfg: RunConfig, out: Path, resumed: bool) -> tuple[nn.Module, Union[VLNData, ConvData]]:
    """Model and data in the order each kind needs: the composed model's tokenizer is trained on the
    data (a resumed run reuses the saved one), so its data come first; an HF model's tokenizer, chat
    format and frame size shape the data, so it comes first."""
    if cfg.model.family == "composed":
        tok = load_tokenizer(out / "tokenizer") if resumed else None
        data = load_vln_data(cfg.data, image_tokens(cfg), cfg.model.vocab_size, tokenizer=tok)
        save_tokenizer(data.tokenizer, out / "tokenizer")
        return build_model(cfg, data), data
    model = build_model(cfg)
    return model, load_conv_data(cfg.data, model, cfg.seed)


def save_final_model(model: nn.Module, directory: Path) -> None:
    """``output_dir/model``: the composed model's own format, or for an HF model a plain HF checkpoint
    with LoRA merged (loadable with ``AutoModelForImageTextToText.from_pretrained``)."""
    if isinstance(model, HFVLMAdapter):
        export_merged(model, directory, overwrite=True)
    else:
        model.save_pretrained(directory)


def train(cfg: RunConfig) -> dict:
    """Run training as configured; returns the summary also written to ``summary.json``."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    ckpt = latest_checkpoint(out / "checkpoints") if cfg.train.resume else None
    if cfg.train.resume and ckpt is None:
        log.warning("resume=true but no checkpoint in %s: starting from scratch", out / "checkpoints")
    seed_everything(cfg.seed)
    model, data = build_model_and_data(cfg, out, resumed=ckpt is not None)
    save_config(cfg, out / "config.yaml")
    log.info("data: %s", json.dumps(data.stats()))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    trainable = trainable_counts(model)
    log.info("trainable parameters: %s", trainable)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    state = {"step": 0, "totals": {"wall_s": 0.0, "samples": 0, "tokens": 0}}
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, state["step"])
    start = state["step"]

    plan = EpochPlan(len(data.samples), cfg.train.batch_size, cfg.seed)
    batches = BatchPrefetcher(data, plan, cfg.train.grad_accum, start, cfg.train.steps)
    sink = JsonlSink(out / "metrics.jsonl", truncate_after_step=start)
    meter = StepMeter()
    model.train()
    with Progress(cfg.train.steps, start, enabled=cfg.train.progress) as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            micro = batches.next()
            t1 = time.perf_counter()
            result = train_step(model, micro, optimizer, scheduler, cfg.optim.grad_clip, cfg.train.precision, device)
            meter.update(micro, result, data_s=t1 - t0, step_s=time.perf_counter() - t0,
                         lr=optimizer.param_groups[0]["lr"])
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                metrics = meter.flush(epoch=plan.epoch_of(step))
                sink.log(step, metrics)
                bar.update(step, metrics)
            else:
                bar.update(step)
            if (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or step == cfg.train.steps:
                state = {"totals": meter.pop_totals(state["totals"])}
                save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler, state, cfg.train.keep_checkpoints)
    batches.close()
    sink.close()
    save_final_model(model, out / "model")
    summary = meter.summary(cfg.train.steps, state["totals"], data.stats(), trainable)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

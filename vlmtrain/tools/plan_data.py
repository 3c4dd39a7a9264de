"""The model and data side of ``vlmtrain plan``: the run's model built without weights, its data read
from the sample indexes (no frame is decoded), its step plan for ``world`` ranks, and what every
step of the first epoch holds (documents, unique frames, labels) on every rank.

Everything goes through the builders training uses (``train/build.py``, ``data/dataset.py``,
``data/sampler.py``), so the plan sees the same samples, packs and steps as ``vlmtrain train``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vlmtrain.config import ConfigError, RunConfig
from vlmtrain.data.dataset import TrainData, conversations_of, load_data, open_indexes, read_sources
from vlmtrain.data.errors import ErrorPolicy
from vlmtrain.data.index import default_index_root
from vlmtrain.models.packed_attention import uses_varlen
from vlmtrain.models.protocol import VLM
from vlmtrain.models.registry import COMPOSED, adapter_class, build_tokenizer, model_type_of
from vlmtrain.tools.plan_arch import MicroShape
from vlmtrain.train.build import TOKENIZER_DIR, build_model, build_plan, prepare_for_training

log = logging.getLogger("vlmtrain")
MAX_STEPS = 2000  # steps of the first epoch whose contents are counted (evenly spaced beyond this)


def _meta_adapter(mcfg, image_size: int):
    """An HF adapter around a weightless (meta-device) model built from ``model.path``'s config, with
    the checkpoint's own tokenizer and image processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from vlmtrain.models.qwen_vl import QwenVLAdapter
    from vlmtrain.models.qwen_vl_inputs import resolve_frame_size

    path = Path(mcfg.path)
    cls = adapter_class(model_type_of(path))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        hf = (getattr(cls, "hf_class", None) or AutoModelForImageTextToText)._from_config(config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    size = (mcfg.frame_size, mcfg.frame_size) if mcfg.frame_size else None
    if issubclass(cls, QwenVLAdapter):
        from transformers import Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        vcfg = config.vision_config
        size = resolve_frame_size(size, int(vcfg.patch_size) * int(vcfg.spatial_merge_size))
    else:
        processor = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
        side = config.vision_config.image_size
        size = size or (side, side)
    return cls(hf, tokenizer, processor, size)


def plan_model(cfg: RunConfig) -> tuple[VLM, str]:
    """(the run's model on the meta device, how it was built). The composed model is built as
    ``train.build.build_model`` builds it, around the run's tokenizer (the one in
    ``output_dir/tokenizer`` when a run left it, else trained on the data text, in memory); an HF
    model from its config without weights, then frozen / LoRA / checkpointing / varlen exactly as
    ``build_model`` does. Falls back to loading the checkpoint on the CPU when a family cannot be
    built without weights."""
    m = cfg.model
    if m.family == COMPOSED:
        texts = conversations_of(read_sources(cfg.data, ErrorPolicy("skip"), cfg.seed))
        tokenizer = build_tokenizer(m, texts, Path(cfg.output_dir) / TOKENIZER_DIR)
        with torch.device("meta"):
            return build_model(cfg, tokenizer), "meta device (no weights)"
    if not Path(m.path).is_dir():
        raise FileNotFoundError(f"model.path={m.path}: not a directory (expected a local HF model directory)")
    try:
        model = _meta_adapter(m, cfg.data.image_size)
        how = "meta device (no weights)"
    except Exception as e:  # a family the weightless path does not know: load it (slow for big models)
        log.warning("plan: %s cannot be built without weights (%s: %s); loading it on the CPU", m.path,
                    type(e).__name__, e)
        return build_model(cfg, None), f"CPU with weights (meta build failed: {type(e).__name__})"
    return prepare_for_training(model, cfg), how


def plan_data(cfg: RunConfig, model: VLM) -> TrainData:
    """The run's training samples from the sample indexes (built once when missing, as training does),
    frames listed but never decoded (``LazyFrames``)."""
    d = cfg.data
    for root in ([s.path for s in d.sources] or [d.root]):
        if not Path(root).exists():
            hint = (f"; the run generates {d.gridnav_episodes} GridNav episodes there first (vlmtrain data "
                    f"gridnav --out {root} --episodes {d.gridnav_episodes}, or vlmtrain train)"
                    if d.gridnav_episodes > 0 and not d.sources else "")
            raise FileNotFoundError(f"data path {root} does not exist{hint}")
    indexes = open_indexes(d, model, default_index_root(d.index_dir))
    return load_data(dataclasses.replace(d, workers=max(d.workers, 1)), model, cfg.seed, indexes,
                     ErrorPolicy(d.on_error))


def build_world_plan(cfg: RunConfig, data: TrainData, model: VLM, world: int, cached: bool):
    """Rank 0's step plan for ``world`` ranks (``train.build.build_plan`` for rank 0 of ``world``);
    a plan that cannot be made (batch not divisible, too few packs) is a ConfigError."""
    try:
        return build_plan(cfg, data, model, cached, world_rank=(world, 0))
    except ValueError as e:
        raise ConfigError(f"no step plan for {world} rank(s): {e}") from None


@dataclass
class StepContents:
    """What every counted step holds, per rank and micro-batch."""

    steps: list[int]  # the plan steps counted
    docs: list[list[list[int]]]  # [step][rank] -> every document length of that rank's micro-batches
    unique: list[list[int]]  # [step][rank] -> unique frames summed over its micro-batches
    labels: list[list[int]]  # [step][rank] -> labelled tokens
    samples: list[list[int]]  # [step][rank] -> samples
    micro: list[MicroShape]  # every counted micro-batch (all ranks)


def _frame_table(data: TrainData) -> tuple[np.ndarray, np.ndarray]:
    """(dense frame ids of every sample's slots, offsets into them per sample)."""
    table = data.samples
    flat, counts = table.store.frames_of(table.rows)
    return table.frame_lookup[flat].astype(np.int64), np.r_[0, np.cumsum(counts)]


def step_contents(plan, data: TrainData, model: VLM, world: int, cached: bool, split: bool = False,
                  max_steps: int = MAX_STEPS) -> StepContents:
    """Every rank's micro-batches of the first epoch's steps (``plan.step`` with each rank's view of the
    plan, as each rank of the run computes it), up to ``max_steps`` of them evenly spaced. ``cached``:
    features come from a warm feature cache (``split``: of vision features; the projector still runs)."""
    n = plan.steps_per_epoch
    steps = list(range(n)) if n <= max_steps else sorted({int(round(i)) for i in np.linspace(0, n - 1, max_steps)})
    lengths, labels = np.asarray(data.samples.lengths), np.asarray(data.samples.label_counts)
    frames, offsets = _frame_table(data)
    varlen = plan.packed and uses_varlen(model)
    k_tokens = model.tokens_per_frame(0)
    views = []
    for r in range(world):
        view = copy.copy(plan)
        view.rank = r
        views.append(view)
    out = StepContents(steps, [], [], [], [], [])
    for k in steps:
        docs, unique, labs, samples = [], [], [], []
        for view in views:
            spec = view.step(k)
            rank_docs, rank_unique = [], 0
            for rows in spec.micro:
                ids = np.asarray([i for row in rows for i in row], dtype=np.int64)
                slots = np.concatenate([frames[offsets[i]:offsets[i + 1]] for i in ids]) if len(ids) else ids
                u = int(len(np.unique(slots)))
                rank_unique += u
                row_docs = tuple(tuple(int(lengths[i]) for i in row) for row in rows)
                rank_docs += [n for row in row_docs for n in row]
                width = max(sum(r) for r in row_docs)
                encoded = 0 if cached else max(u, 1)  # a micro-batch without frames encodes one black frame
                projected = encoded if not cached else (u if split else 0)
                out.micro.append(MicroShape(row_docs, width, varlen, encoded, projected,
                                            int(len(slots)) * k_tokens, int(labels[ids].sum())))
            docs.append(rank_docs)
            unique.append(rank_unique)
            labs.append(int(sum(labels[i] for rows in spec.micro for row in rows for i in row)))
            samples.append(sum(len(row) for rows in spec.micro for row in rows))
        out.docs.append(docs)
        out.unique.append(unique)
        out.labels.append(labs)
        out.samples.append(samples)
    return out


def sample_stats(data: TrainData) -> dict:
    """Samples per source, tokens and image slots per sample, unique frames."""
    lengths = np.asarray(data.samples.lengths)
    slots = np.asarray(data.samples.num_frames)
    return {"samples": int(len(lengths)), "frames": int(len(data.frames)), "sources": data.sources,
            "skipped": dict(data.skipped),
            "tokens_per_sample": {"mean": round(float(lengths.mean()), 2), "min": int(lengths.min()),
                                  "max": int(lengths.max())},
            "images_per_sample": {"mean": round(float(slots.mean()), 3), "min": int(slots.min()),
                                  "max": int(slots.max())}}


def packing_stats(plan) -> Optional[dict]:
    """Packs of the first epoch (None for padded batches)."""
    if not plan.packed:
        return None
    packs, _ = plan.epoch_plan(0)
    return {"packs": len(packs), "samples_per_pack": round(float(np.mean(packs.sizes())), 2),
            "token_budget": int(plan.max_tokens), "packs_per_micro_batch": int(plan.rows)}


def micro_shape(batch, varlen: bool, cached: bool = False) -> MicroShape:
    """The :class:`MicroShape` of a collated micro-batch (``data.loader.Batch``), as
    :func:`step_contents` derives it from the plan: what the activation model is held to."""
    rows = tuple(tuple(int(n) for n in row) for row in batch.doc_lengths)
    unique = int(batch.pixels.shape[0])
    encoded = 0 if cached else max(unique, 1)
    return MicroShape(rows, int(batch.input_ids.shape[1]), bool(batch.packed and varlen), encoded, encoded,
                      int(batch.num_visual_tokens), int(batch.num_label_tokens))

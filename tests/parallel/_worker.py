"""Multi-rank checks of ``vlmtrain.parallel``, launched by ``tests/parallel/test_dist.py`` as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/parallel/_worker.py <mode> <outdir>

``mode`` is ``ddp`` or ``fsdp2``. Each rank trains a tiny real composed VLM on its own random
micro-batches through the real ``train_step`` (``parallel=``: token-weighted loss, global-norm
clipping, DDP ``no_sync`` on accumulation micro-steps, a rank without frames encoding a black one);
rank 0 also trains an unwrapped copy on all ranks' micro-batches concatenated (the single-process
reference) and compares. Every rank writes ``<outdir>/rank<r>.json`` with the measured
differences and exits non-zero if a check fails. Collectives time out after 60 s, so a hang (e.g. a
rank without images) fails the run instead of blocking it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

from vlmtrain.config import ModelConfig
from vlmtrain.config_parallel import ParallelConfig
from vlmtrain.data.loader import Batch
from vlmtrain.parallel.init import (
    DistInfo, all_reduce_max, all_reduce_min, all_reduce_sum, barrier, broadcast_object, destroy, get_logger,
    init_distributed,
)
from vlmtrain.parallel.memory import SyncedEmptyCache, memory_stats, memory_stats_over_ranks
from vlmtrain.parallel.parallelize import StepRoot, accumulation_context, parallelize, transformer_blocks, unwrap
from vlmtrain.models.composed import ComposedVLM, build_composed_vlm
from vlmtrain.models.composed_chat import train_tokenizer
from vlmtrain.train.step import train_step

# A 64-token vocabulary (BPE on enough distinct words to fill it); ids from FIRST_TEXT_ID on are plain text.
TOKENIZER = train_tokenizer([" ".join(f"word{i}" for i in range(300))], vocab_size=64)
IMAGE_SIZE, VOCAB = 16, len(TOKENIZER)
IMAGE_ID, PAD_ID = TOKENIZER.convert_tokens_to_ids("<image>"), TOKENIZER.pad_token_id
FIRST_TEXT_ID = 8  # after <pad> <unk> <bos> <eos> <image> <|user|> <|assistant|> <|system|>
MCFG = ModelConfig(vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, patch_size=4,
                   pixel_shuffle=2, lm_hidden=32, lm_layers=2, lm_heads=2, lm_kv_heads=2, lm_intermediate=64,
                   max_position=64)
K = (IMAGE_SIZE // MCFG.patch_size // MCFG.pixel_shuffle) ** 2  # visual tokens per frame
B, L = 2, 24  # samples per micro-batch, padded length
LR = 0.2
STEPS = 3
TOL = 1e-5
CLIP = 0.5  # below the tiny model's gradient norms (~1), so clipping is active in every step

Schedule = list[list[Batch]]  # per optimizer step, this rank's micro-batches


def tiny_model() -> ComposedVLM:
    """The same randomly initialised model on every rank and for the reference."""
    torch.manual_seed(0)
    return build_composed_vlm(MCFG, image_size=IMAGE_SIZE, tokenizer=TOKENIZER, max_frame_slots=3)


def make_batch(seed: int, images: bool = True) -> Batch:
    """B samples of random text; with images each sample shows 2 frames (3 unique in the batch, one
    shared) at its start. Label counts vary with the seed, so ranks hold different numbers of labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_TEXT_ID, VOCAB, (B, L), generator=g)  # never IMAGE_ID or PAD_ID
    mask = torch.ones(B, L, dtype=torch.long)
    if images:
        ids[:, 1:1 + 2 * K] = IMAGE_ID
        pixels = torch.randint(0, 256, (3, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8)
        slot_frames, slot_age = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 0, 1, 0])
    else:
        pixels = torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        slot_frames, slot_age = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    labels = ids.clone()
    labels[torch.rand(B, L, generator=g) < 0.5] = -100
    labels[ids == IMAGE_ID] = -100
    labels[:, 0] = -100  # never a target (the loss shifts), so num_label_tokens counts the loss's terms
    pad = int(torch.randint(0, 3, (1,), generator=g))  # right padding of the last sample
    if pad:
        ids[-1, L - pad:], labels[-1, L - pad:], mask[-1, L - pad:] = PAD_ID, -100, 0
    labels[:, -3] = ids[:, -3]  # at least one label per sample (the last sample's pad is < 3)
    return Batch(input_ids=ids, labels=labels, attention_mask=mask, pixels=pixels, slot_frames=slot_frames,
                 slot_age=slot_age, num_samples=B, num_tokens=int(mask.sum()),
                 num_label_tokens=int((labels != -100).sum()), num_slots=len(slot_frames),
                 num_visual_tokens=int((ids == IMAGE_ID).sum()))


def concat(batches: list[Batch]) -> Batch:
    """One batch holding all rows of ``batches`` (same padded length), slots re-indexed."""
    offsets = torch.tensor([0] + [b.pixels.shape[0] for b in batches]).cumsum(0)
    cat = lambda name: torch.cat([getattr(b, name) for b in batches])  # noqa: E731
    return Batch(input_ids=cat("input_ids"), labels=cat("labels"), attention_mask=cat("attention_mask"),
                 pixels=cat("pixels"), slot_frames=torch.cat([b.slot_frames + o for b, o in zip(batches, offsets)]),
                 slot_age=cat("slot_age"), num_samples=sum(b.num_samples for b in batches),
                 num_tokens=sum(b.num_tokens for b in batches),
                 num_label_tokens=sum(b.num_label_tokens for b in batches),
                 num_slots=sum(b.num_slots for b in batches),
                 num_visual_tokens=sum(b.num_visual_tokens for b in batches),
                 step_label_tokens=batches[0].step_label_tokens)


def schedule(world: int, micro: int, text_only: Callable[[int, int], bool]) -> list[Schedule]:
    """Every rank's micro-batches, per rank (so rank 0 can rebuild all of them for the reference). Each
    batch carries its step's label tokens over all ranks, as the real plan's batches do."""
    plan = [[[make_batch(1000 * s + 10 * r + m, images=not text_only(s, r)) for m in range(micro)]
             for s in range(STEPS)] for r in range(world)]
    for s in range(STEPS):
        total = sum(b.num_label_tokens for r in range(world) for b in plan[r][s])
        for r in range(world):
            plan[r][s] = [dataclasses.replace(b, step_label_tokens=total) for b in plan[r][s]]
    return plan


def train(parallel: torch.nn.Module, steps: Schedule, world: int) -> tuple[float, list[float]]:
    """SGD through ``train_step`` (``parallel`` given on more than one rank). Returns the last step's
    loss (over all ranks) and every step's gradient norm before clipping."""
    model = unwrap(parallel)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    last, norms = 0.0, []
    for micro in steps:
        out = train_step(model, micro, opt, sched, CLIP, "fp32", torch.device("cpu"), world_size=world,
                         parallel=parallel if world > 1 else None)
        last = out["loss"]
        norms.append(out["grad_norm"])
    return last, norms


def count_syncs(parallel: torch.nn.Module) -> list[int]:
    """A DDP comm hook that counts gradient all-reduces (one per bucket per synced backward)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = [0]

    def hook(state, bucket):
        calls[0] += 1
        return allreduce_hook(None, bucket)

    parallel.register_comm_hook(None, hook)
    return calls


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) fp32 weights of the inner model, on every rank."""
    inner = unwrap(model)
    if any(hasattr(p, "full_tensor") for p in inner.parameters()):  # FSDP2: DTensor shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True))
    else:
        state = inner.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class Checks:
    """Named measurements with their bounds; all are written out, failures raise at the end."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.failures: list[str] = []

    def at_most(self, name: str, value: float, bound: float) -> None:
        self.values[name] = value
        if not value <= bound:
            self.failures.append(f"{name}={value:.3g} > {bound:g}")

    def at_least(self, name: str, value: float, bound: float) -> None:
        self.values[name] = value
        if not value >= bound:
            self.failures.append(f"{name}={value:.3g} < {bound:g}")


def run_case(name: str, backend: str, info: DistInfo, checks: Checks, *, micro: int = 1,
             text_only: Callable[[int, int], bool] = lambda s, r: False, freeze_vision: bool = False,
             mixed_precision: str = "fp32", reference: bool = True) -> dict[str, torch.Tensor]:
    """Train with ``backend`` on 2 ranks; check ranks agree and (rank 0) match the reference. DDP
    cases record ``<name>/syncs``, the gradient all-reduces of the run."""
    plan = schedule(info.world_size, micro, text_only)
    model = tiny_model()
    if freeze_vision:
        model.vision.requires_grad_(False)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    parallel = parallelize(model, ParallelConfig(backend=backend, fsdp_mixed_precision=mixed_precision), info)
    syncs = count_syncs(parallel) if backend == "ddp" else None
    loss, norms = train(parallel, plan[info.rank], info.world_size)
    if syncs is not None:
        checks.values[f"{name}/syncs"] = float(syncs[0])
    checks.at_most(f"{name}/loss_finite", 0.0 if math.isfinite(loss) else 1.0, 0.0)
    state = full_state(parallel)
    checks.at_most(f"{name}/ranks_agree", max_diff(state, broadcast_object(state)), 0.0)
    checks.at_least(f"{name}/moved", max_diff(state, {k: v.float() for k, v in init.items()}), 1e-3)
    checks.at_least(f"{name}/clipping_active", min(norms) - CLIP, 1e-3)
    if reference and info.is_main:
        ref = tiny_model()
        if freeze_vision:
            ref.vision.requires_grad_(False)
        ref_loss, ref_norms = train(StepRoot(ref), [[concat([b for r in range(info.world_size) for b in plan[r][s]])]
                                                    for s in range(STEPS)], world=1)
        checks.at_most(f"{name}/vs_single_process", max_diff(state, full_state(ref)), TOL)
        checks.at_most(f"{name}/loss_vs_single_process", abs(loss - ref_loss), TOL)
        checks.at_most(f"{name}/grad_norm_vs_single_process", max(abs(a - b) for a, b in zip(norms, ref_norms)), TOL)
        # Rank 0's data alone leads elsewhere: the comparison above can tell the two apart.
        alone = tiny_model()
        if freeze_vision:
            alone.vision.requires_grad_(False)
        train(StepRoot(alone), [[concat(plan[0][s])] for s in range(STEPS)], world=1)
        checks.at_least(f"{name}/differs_from_rank0_alone", max_diff(state, full_state(alone)), 1e-4)
    barrier()
    return state


def check_helpers(info: DistInfo, checks: Checks) -> None:
    """init.py and memory.py under a real 2-rank gloo group on CPU."""
    checks.at_most("helpers/world", abs(info.world_size - 2), 0)
    checks.at_most("helpers/backend_gloo", 0.0 if info.backend == "gloo" and info.device.type == "cpu" else 1.0, 0)
    checks.at_most("helpers/sum", abs(all_reduce_sum(info.rank + 1) - 3), 0)
    checks.at_most("helpers/max", abs(all_reduce_max(info.rank + 1) - 2), 0)
    checks.at_most("helpers/min", abs(all_reduce_min(info.rank + 1) - 1), 0)
    checks.at_most("helpers/broadcast", 0.0 if broadcast_object({"from": info.rank}) == {"from": 0} else 1.0, 0)
    logger = get_logger(info)
    checks.at_most("helpers/null_logger", 0.0 if logger.disabled == (not info.is_main) else 1.0, 0)
    logger.info("only rank 0 prints this")
    stats = memory_stats(info.device)
    checks.at_most("helpers/memory_cpu_empty", float(len(stats) + len(memory_stats_over_ranks(stats))), 0)
    checks.at_most("helpers/empty_cache_cpu", float(SyncedEmptyCache(threshold_gib=1.0)(info.device)), 0)


def check_blocks(info: DistInfo, checks: Checks) -> None:
    """FSDP2 shards exactly the 2 vision + 2 LM blocks plus the root."""
    from torch.distributed.fsdp import FSDPModule

    parallel = parallelize(tiny_model(), ParallelConfig(backend="fsdp2"), info)
    blocks = transformer_blocks(parallel)
    sharded = [m for m in parallel.modules() if isinstance(m, FSDPModule)]
    checks.at_most("fsdp2/blocks_found", abs(len(blocks["vision"]) - 2) + abs(len(blocks["llm"]) - 2), 0)
    checks.at_most("fsdp2/sharded_modules", abs(len(sharded) - 5), 0)
    checks.at_most("fsdp2/accumulation_ctx_noop",
                   0.0 if isinstance(accumulation_context(parallel, False), contextlib.nullcontext) else 1.0, 0)


def main() -> None:
    mode, outdir = sys.argv[1], Path(sys.argv[2])
    info = init_distributed(timeout_s=60)
    torch.set_num_threads(1)
    checks = Checks()
    error = ""
    rank1_text = lambda s, r: r == 1 and s == 1  # noqa: E731  rank 1 sees no frame in step 1
    try:
        if mode == "ddp":
            check_helpers(info, checks)
            run_case("ddp", "ddp", info, checks)
            run_case("ddp_accum", "ddp", info, checks, micro=2)
            # no_sync: 2 micro-batches per step all-reduce as often as 1 (once per step, not per micro-batch).
            checks.at_most("ddp/accum_syncs_per_step_vs_one_micro",
                           abs(checks.values["ddp_accum/syncs"] - checks.values["ddp/syncs"]), 0)
            run_case("ddp_text_only_rank", "ddp", info, checks, text_only=rank1_text)
            run_case("ddp_text_only_rank_frozen_vision", "ddp", info, checks, text_only=rank1_text,
                     freeze_vision=True)
        elif mode == "fsdp2":
            check_blocks(info, checks)
            run_case("fsdp2", "fsdp2", info, checks)
            run_case("fsdp2_accum", "fsdp2", info, checks, micro=2)
            run_case("fsdp2_text_only_rank", "fsdp2", info, checks, text_only=rank1_text)
            run_case("fsdp2_text_only_rank_frozen_vision", "fsdp2", info, checks, text_only=rank1_text,
                     freeze_vision=True)
            # bf16 compute with fp32 reduction: runs, learns, stays finite (no exact reference).
            run_case("fsdp2_bf16", "fsdp2", info, checks, mixed_precision="bf16", reference=False)
        else:
            raise ValueError(f"unknown mode {mode!r}")
    except Exception:  # recorded for the test's message, then re-raised through the exit code
        error = traceback.format_exc()
    report_and_exit(info, outdir, checks, error)


def report_and_exit(info: DistInfo, outdir: Path, checks: Checks, error: str) -> None:
    """Write this rank's report (``rank<r>.json``: checks, failures, traceback) for the test to read,
    tear the process group down and exit non-zero on any failure. Shared with ``_ds_worker.py``."""
    outdir.mkdir(parents=True, exist_ok=True)
    ok = not error and not checks.failures
    (outdir / f"rank{info.rank}.json").write_text(json.dumps(
        {"ok": ok, "values": checks.values, "failures": checks.failures, "error": error}, indent=1))
    if error:
        print(error, file=sys.stderr)
    destroy()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

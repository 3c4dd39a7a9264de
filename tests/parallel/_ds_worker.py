"""Multi-rank DeepSpeed ZeRO-2 / ZeRO-3 checks, launched by ``tests/parallel/test_deepspeed.py`` as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/parallel/_ds_worker.py <phase> <outdir>

``phase`` ``train``: every case trains the tiny composed VLM (``_worker.tiny_model``) through the real
``train_step`` (``parallel=`` the engine) for 5 steps of 2 micro-batches per rank (rank 1 has no frame
in step 2, rank 0 none in step 4), with AdamW, a warmup schedule and active clipping, saves a
DeepSpeed checkpoint after step 3 and records every step's loss and gradient norm; rank 0 also trains a plain copy on each step's micro-batches of both ranks
concatenated (the single-process reference). ``resume`` (a fresh launch): each case loads the step-3
checkpoint and runs steps 4-5 again. Each rank writes ``<outdir>/rank<r>.json``; collectives time out
after 60 s, so a hang fails the run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from _worker import Checks, concat, make_batch, max_diff, report_and_exit, tiny_model
from vlmtrain.config_parallel import ParallelConfig
from vlmtrain.parallel.deepspeed_engine import DeepSpeedEngine, deepspeed_config
from vlmtrain.parallel.init import DistInfo, barrier, init_distributed
from vlmtrain.parallel.parallelize import parallelize, unwrap
from vlmtrain.train.step import batch_loss, train_step

CPU = torch.device("cpu")
STEPS, MICRO, SAVE_AT = 5, 2, 3
LR, CLIP, WD = 1e-2, 0.5, 0.1
LOSS_TOL = 1e-5  # fp32: only the order of the gradient sums differs from the reference
# Adam divides by sqrt(v): where the exact gradient is 0 (attention key biases: softmax ignores them)
# summation noise moves the update by up to a few % of lr (measured ~1.5e-4 at lr 1e-2), while the
# losses and gradient norms agree to ~1e-6.
WEIGHT_TOL = 0.1 * LR
BF16_LOSS_TOL = 1e-2  # bf16 compute against the fp32 reference (measured ~3e-4)
SMALL = 4000  # bucket sizes in elements (the model has ~30k): several buckets per backward
CASES: dict[str, dict[str, Any]] = {
    "zero2": dict(stage=2, reduce_bucket_size=SMALL, allgather_bucket_size=SMALL, overlap_comm=True),
    # Persistence threshold 0: every parameter is partitioned and gathered in its module's forward.
    "zero3": dict(stage=3, reduce_bucket_size=SMALL, stage3_prefetch_bucket_size=SMALL,
                  stage3_param_persistence_threshold=0, overlap_comm=False),
    "zero3_offload": dict(stage=3, offload_optimizer="cpu", offload_param="cpu", reduce_bucket_size=SMALL,
                          stage3_prefetch_bucket_size=SMALL, stage3_param_persistence_threshold=0),
    # bf16 parameters (fp32 master weights in the optimizer), computed under autocast as train_step
    # does: within BF16_LOSS_TOL of the fp32 reference, finite, learning, and resumed bitwise.
    "zero3_bf16": dict(stage=3, bf16=True, reduce_bucket_size=SMALL, stage3_prefetch_bucket_size=SMALL,
                       stage3_param_persistence_threshold=0),
}


def text_only(step: int, rank: int) -> bool:
    """Steps count from 1: rank 1 sees no frame in step 2, rank 0 none in step 4 (after the resume)."""
    return (step, rank) in ((2, 1), (4, 0))


def plan(world: int) -> list[list[list[Any]]]:
    """plan[rank][step - 1] = that rank's micro-batches, each carrying its step's label tokens over all
    ranks (as the real plan's batches do). A micro-batch without frames runs the encoder on a black
    frame whose features no slot uses (``FeatureSource.features``), so its graph has the modules of
    one with frames in the same order (ZeRO-2/3 need that)."""
    batches = [[[make_batch(1000 * s + 10 * r + m, images=not text_only(s, r)) for m in range(MICRO)]
                for s in range(1, STEPS + 1)] for r in range(world)]
    for s in range(STEPS):
        total = sum(b.num_label_tokens for r in range(world) for b in batches[r][s])
        for r in range(world):
            batches[r][s] = [dataclasses.replace(b, step_label_tokens=total) for b in batches[r][s]]
    return batches


def optimizer_and_schedule(model: torch.nn.Module):
    """AdamW with decay on matrices only (two groups, like optim.py) and a 3-step linear warmup."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}], lr=LR)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 3))


@functools.lru_cache(maxsize=1)
def reference_run(world: int) -> tuple[list[float], list[float], dict]:
    """The single-process reference, computed once per launch (every case shares it)."""
    return reference(plan(world), world)


def reference(batches: list[list[list[Any]]], world: int) -> tuple[list[float], list[float], dict]:
    """One process, one batch per step holding every rank's micro-batches: losses, norms, weights."""
    model = tiny_model()
    opt, sched = optimizer_and_schedule(model)
    losses, norms = [], []
    for s in range(STEPS):
        loss = batch_loss(model, concat([b for r in range(world) for b in batches[r][s]]), CPU)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(engine: DeepSpeedEngine, mine: list[list[Any]], world: int, steps: range, save_dir: Path,
        bf16: bool) -> tuple[list[float], list[float]]:
    """Steps ``steps`` (1-based) of this rank's micro-batches through ``train_step`` (the engine's
    backward per micro-batch, its step: clipping, AdamW, schedule); saves after step SAVE_AT."""
    losses, norms = [], []
    for s in steps:
        out = train_step(engine.model, mine[s - 1], None, None, CLIP, "bf16" if bf16 else "fp32", CPU,
                         world_size=world, parallel=engine)
        losses.append(out["loss"])
        norms.append(out["grad_norm"])
        if s == SAVE_AT:
            engine.save(save_dir, client_state={"step": s}, tag=f"step{s}")
    return losses, norms


def compare_to_reference(name: str, losses: list[float], norms: list[float], state: dict, bf16: bool,
                         world: int, checks: Checks) -> None:
    """Rank 0: the run against one process on the concatenated global batch (fp32)."""
    ref_losses, ref_norms, ref_state = reference_run(world)
    checks.values[f"{name}/reference_losses"] = ref_losses  # type: ignore[assignment]
    worst_step = lambda a, b: max(abs(x - y) for x, y in zip(a, b))  # noqa: E731
    if bf16:
        checks.at_most(f"{name}/loss_vs_fp32_single_process", worst_step(losses, ref_losses), BF16_LOSS_TOL)
        return
    checks.at_most(f"{name}/loss_vs_single_process", worst_step(losses, ref_losses), LOSS_TOL)
    checks.at_most(f"{name}/grad_norm_vs_single_process", worst_step(norms, ref_norms), LOSS_TOL)
    checks.at_most(f"{name}/weights_vs_single_process", max_diff(state, ref_state), WEIGHT_TOL)
    worst = max(state, key=lambda k: float((state[k] - ref_state[k]).abs().max()))
    checks.values[f"{name}/weights_worst_tensor"] = worst  # type: ignore[assignment]
    checks.at_least(f"{name}/clipping_active", min(norms) - CLIP, 1e-3)


def train_case(name: str, info: DistInfo, outdir: Path, checks: Checks, phase: str) -> None:
    """One case of CASES: train (5 steps, save after 3) or resume (load, steps 4-5), then check."""
    world = info.world_size
    batches = plan(world)
    settings = {"bf16": False, "grad_accum": MICRO, "grad_clip": CLIP, "wall_clock_breakdown": True, **CASES[name]}
    cfg, bf16 = deepspeed_config(**settings), bool(settings["bf16"])
    model = tiny_model()
    opt, sched = optimizer_and_schedule(model)
    t0 = time.perf_counter()
    engine = parallelize(model, ParallelConfig(backend="deepspeed"), info, precision="bf16" if bf16 else "fp32",
                         optimizer=opt, deepspeed=cfg, scheduler=sched)
    assert isinstance(engine, DeepSpeedEngine) and unwrap(engine) is model and engine.model is model
    checks.values[f"{name}/{phase}_initialize_s"] = time.perf_counter() - t0
    save_dir = outdir.parent / "ckpt" / name
    t0 = time.perf_counter()
    if phase == "train":
        losses, norms = run(engine, batches[info.rank], world, range(1, STEPS + 1), save_dir, bf16)
    else:
        client = engine.load(save_dir, tag=f"step{SAVE_AT}")
        checks.at_most(f"{name}/client_state_step", abs(client.get("step", -1) - SAVE_AT), 0)
        losses, norms = run(engine, batches[info.rank], world, range(SAVE_AT + 1, STEPS + 1), save_dir, bf16)
    checks.values[f"{name}/{phase}_steps_s"] = time.perf_counter() - t0
    timings = engine.timings()
    checks.at_least(f"{name}/wall_clock_breakdown_keys", len(timings), 3)
    state = engine.full_state_dict()
    checks.at_most(f"{name}/{phase}_losses_finite", float(not all(math.isfinite(x) for x in losses)), 0)
    checks.values[f"{name}/{phase}_losses"] = losses  # type: ignore[assignment]
    final, saved_losses = outdir.parent / f"{name}_final.safetensors", outdir.parent / f"{name}_losses.json"
    if phase == "train" and info.is_main:
        checks.at_least(f"{name}/learns", losses[0] - losses[-1], 1e-2)
        compare_to_reference(name, losses, norms, state, bf16, world, checks)
        save_file(state, str(final))
        saved_losses.write_text(json.dumps(losses))
    if phase == "resume":  # against the uninterrupted run of the train launch
        worst = max(abs(a - b) for a, b in zip(losses, json.loads(saved_losses.read_text())[SAVE_AT:]))
        checks.at_most(f"{name}/resumed_losses_vs_uninterrupted", worst, 1e-6)
        checks.at_most(f"{name}/resumed_weights_vs_uninterrupted", max_diff(state, load_file(str(final))), 1e-6)
    barrier()


def main() -> None:
    phase, outdir = sys.argv[1], Path(sys.argv[2])
    cases = sys.argv[3].split(",") if len(sys.argv) > 3 else list(CASES)
    info = init_distributed(timeout_s=60)
    torch.set_num_threads(1)
    checks, error = Checks(), ""
    try:
        for name in cases:
            train_case(name, info, outdir, checks, phase)
    except Exception:  # recorded for the test's message, then re-raised through the exit code
        error = traceback.format_exc()
    report_and_exit(info, outdir, checks, error)


if __name__ == "__main__":
    main()

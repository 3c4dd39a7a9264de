"""The bytes a rank really holds, for ``tests/tools/test_plan.py``, launched as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/tools/_plan_worker.py CONFIG OUTDIR CASES

``CASES``: comma-separated names of :data:`CASES` (overrides of ``CONFIG``). For each, the run of ``CONFIG`` is
built exactly as ``vlmtrain train`` builds it (``train/build.py``: model and data, feature source,
plan, ``parallel_and_optimizer``) with that backend, and one optimizer step of its real micro-batches
runs by hand so the state can be read in between: after the last backward the gradients, after the
optimizer step the parameters and the optimizer state. Each rank writes ``OUTDIR/rank<r>.json``:
``{case: {"parameters": ..., "gradients": ..., "optimizer": ...}}`` (bytes of distinct storages).

What is read, per backend:

- ddp / fsdp2: every parameter (FSDP2: its local shard, ``DTensor.to_local()``), every ``.grad``
  (FSDP2: the local gradient shard), every tensor in ``optimizer.state``;
- ZeRO-2: the parameters (views into DeepSpeed's flat per-group buffers, counted as those buffers),
  the gradient partition (``averaged_gradients`` and the ``grads_in_partition`` buffer), the fp32
  master partitions ``single_partition_of_fp32_groups`` and the inner optimizer's ``state``;
- ZeRO-3: every parameter's partition ``ds_tensor`` plus the whole data of the parameters that stay
  gathered (``ds_persist``), the gradient partitions (``grad_partitions_flat_buffer``), the fp32
  partitions ``fp32_partitioned_groups_flat`` and the inner optimizer's ``state``.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

from vlmtrain.config import RunConfig, load_config
from vlmtrain.features.source import open_feature_source
from vlmtrain.parallel.deepspeed_engine import DeepSpeedEngine
from vlmtrain.parallel.init import barrier, init_distributed
from vlmtrain.parallel.parallelize import accumulation_context, unwrap
from vlmtrain.tools.plan_measure import optimizer_state_tensors, unique_bytes
from vlmtrain.train.build import build_batches, build_model_and_data, build_plan, parallel_and_optimizer, rank_features
from vlmtrain.train.step import autocast_context, micro_loss

DS2, DS3 = (["parallel.backend=deepspeed", f"parallel.deepspeed_zero_stage={s}"] for s in (2, 3))
CASES = {"ddp": ["parallel.backend=ddp"], "fsdp2": ["parallel.backend=fsdp2"], "zero2": DS2, "zero3": DS3,
         # bf16 weights with fp32 master partitions; a frozen tower outside the optimizer's groups
         "zero2_bf16_frozen": DS2 + ["train.precision=bf16", "train.freeze_vision=true"],
         # every parameter partitioned (none persistent)
         "zero3_bf16_partitioned": DS3 + ["train.precision=bf16",
                                          "parallel.deepspeed_stage3_param_persistence_threshold=0"]}


def _zero_optimizer(engine: DeepSpeedEngine):
    return engine.engine.optimizer


def gradient_bytes(parallel, model) -> int:
    """Bytes of this rank's gradients after the step's last backward."""
    if isinstance(parallel, DeepSpeedEngine):
        zero = _zero_optimizer(parallel)
        if hasattr(zero, "grad_partitions_flat_buffer"):  # ZeRO-3
            return unique_bytes([zero.grad_partitions_flat_buffer])
        grads = [g for group in zero.averaged_gradients.values() for g in (group or [])]
        return unique_bytes(grads + [getattr(zero, "grads_in_partition", None)])
    return unique_bytes([p.grad for p in model.parameters()])


def parameter_bytes(parallel, model) -> int:
    """Bytes of this rank's parameters (shards, partitions, flat buffers, persistent full copies)."""
    params = list(model.parameters())
    if isinstance(parallel, DeepSpeedEngine) and hasattr(params[0], "ds_tensor"):  # ZeRO-3
        return unique_bytes([p.ds_tensor for p in params] + [p.data for p in params if p.ds_persist])
    return unique_bytes(params)


def optimizer_bytes(parallel, optimizer) -> int:
    """Bytes of this rank's optimizer state: moments and step counters (and DeepSpeed's fp32 master
    partitions, which are the optimizer's parameters)."""
    if isinstance(parallel, DeepSpeedEngine):
        zero = _zero_optimizer(parallel)
        masters = (getattr(zero, "fp32_partitioned_groups_flat", None)
                   or getattr(zero, "single_partition_of_fp32_groups", None) or [])
        params = {t.untyped_storage().data_ptr() for t in parameter_tensors(parallel)}
        own = [t for t in masters if t.untyped_storage().data_ptr() not in params]  # not shared with the weights
        return unique_bytes(optimizer_state_tensors(zero.optimizer) + own)
    return unique_bytes(optimizer_state_tensors(optimizer))


def parameter_tensors(parallel) -> list[torch.Tensor]:
    params = list(unwrap(parallel).parameters())
    return [getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p for p in params]


def run_case(name: str, config: Path, out: Path, info) -> dict[str, int]:
    cfg = load_config(RunConfig(), config, [*CASES[name], f"output_dir={out / name}"])
    run = Path(cfg.output_dir)
    model, data = build_model_and_data(cfg, run)
    source = open_feature_source(rank_features(cfg.features, cfg.parallel, info, run), model, run,
                                 frames=len(data.frames))
    plan = build_plan(cfg, data, model, source.uses_cache)
    parallel, optimizer, _ = parallel_and_optimizer(model, cfg, info, run, source.uses_cache)
    batches, _ = build_batches(cfg, data, model, source, 0, 1, plan=plan)
    micro = batches.next()
    batches.close()
    device = torch.device("cpu")
    engine = parallel if isinstance(parallel, DeepSpeedEngine) else None
    parallel.train()
    total = micro[0].step_label_tokens
    for i, b in enumerate(micro):
        last = i == len(micro) - 1
        with accumulation_context(parallel, last):
            with autocast_context(cfg.train.precision, device):  # as train_step runs it
                loss, _ = parallel(micro_loss, b, device, source)
            weighted = loss * (b.num_label_tokens * info.world_size / max(total, 1))
            engine.backward(weighted, last_micro=last) if engine is not None else weighted.backward()
    out = {"gradients": gradient_bytes(parallel, unwrap(parallel))}
    if engine is not None:
        engine.step()
    else:
        optimizer.step()
    out["parameters"] = parameter_bytes(parallel, unwrap(parallel))
    out["optimizer"] = optimizer_bytes(parallel, optimizer)
    source.close()
    barrier()
    return out


def main() -> None:
    config, outdir, cases = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
    info = init_distributed(timeout_s=120)
    torch.set_num_threads(1)
    report: dict = {"rank": info.rank, "world_size": info.world_size, "error": ""}
    try:
        for name in cases:
            report[name] = run_case(name, config, outdir, info)
    except Exception:  # reported to the test, then through the exit code
        report["error"] = traceback.format_exc()
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"rank{info.rank}.json").write_text(json.dumps(report, indent=1))
    sys.exit(1 if report["error"] else 0)


if __name__ == "__main__":
    main()

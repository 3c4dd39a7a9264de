"""``vlmtrain plan``: what a run will cost before it runs, from its config, its data's sample indexes
and its model built without weights. Nothing is trained, no frame is decoded.

The report (a dict; :func:`format_plan` prints it as tables, ``--json`` as JSON):

- **model**: parameters total / trainable / LoRA per part (``plan_data.plan_model``);
- **data**: samples per source after ``%N``, tokens and images per sample, packs (``plan_data``);
- **batch**: per-device micro-batch x accumulation x ranks = global batch, steps per epoch and in
  total (``train.build.resolve_steps``);
- **compute**: FLOPs per step from the FLOPs model training logs MFU with (``train.build.run_flops``
  on every rank's micro-batches of the first epoch, summed over ranks), and the step / epoch / run
  time at a MFU: the one ``vlmtrain bench`` measured for this config on this GPU
  (``OUTPUT_DIR/bench.json``), else an assumption that is printed as one;
- **memory**: per rank and backend, parameters, gradients, optimizer state (``plan_memory``),
  transient buffers and the activations of the largest micro-batch with and without activation
  checkpointing (``plan_activations``), and whether that fits the GPU; the feature cache's disk size.

Every assumption the numbers rest on is listed under ``assumptions``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vlmtrain.config import ConfigError, RunConfig
from vlmtrain.features.source import cache_decision, spatial_bytes_per_frame
from vlmtrain.metrics.flops import peak_flops
from vlmtrain.models.parts import is_lora_param, model_parts
from vlmtrain.models.spatial import spatial_branch
from vlmtrain.tools import plan_memory as pm
from vlmtrain.tools.plan_activations import activation_bytes
from vlmtrain.tools.plan_arch import model_spec
from vlmtrain.tools.plan_data import (build_world_plan, packing_stats, plan_data, plan_model, sample_stats,
                                      step_contents)
from vlmtrain.train.build import resolve_steps, run_flops

DEFAULT_MFU = 0.35  # assumed for a packed VLM step on an H100 / H200 / A100 class GPU without a bench result
HEADROOM = 0.90  # share of device memory a run may plan to use (CUDA context, allocator caching, NCCL)


@dataclass(frozen=True)
class Gpu:
    """A GPU kind: its name for ``peak_flops`` and the memory torch reports for it."""

    name: str
    memory_gib: float


GPUS = {
    "h100": Gpu("H100 SXM5 80GB", 79.6), "h100-pcie": Gpu("H100 PCIe 80GB", 79.6),
    "h100-nvl": Gpu("H100 NVL 94GB", 93.1), "h200": Gpu("H200 SXM 141GB", 139.8),
    "h200-nvl": Gpu("H200 NVL 141GB", 139.8), "a100": Gpu("A100 SXM4 80GB", 79.2),
    "a100-80": Gpu("A100 SXM4 80GB", 79.2), "a100-40": Gpu("A100 SXM4 40GB", 39.4),
}


@dataclass
class _Source:
    """What ``run_flops`` reads of a feature source: whether the cache is used, and split."""

    uses_cache: bool
    split: bool


def check_plan_args(gpus: int, nodes: int, gpu: str, mfu: Optional[float]) -> None:
    """Raise ConfigError for a rank count below 1, an unknown GPU kind or a MFU outside (0, 1]."""
    if gpus < 1 or nodes < 1:
        raise ConfigError(f"--gpus {gpus} --nodes {nodes}: both must be >= 1")
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu}: unknown; choose from {', '.join(GPUS)}")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: must be in (0, 1]")


def _feature_cache(cfg: RunConfig, model, frames: int, world: int, assumptions: list[str]) -> dict:
    """Whether the run would read features from a cache, and how big it is on disk (``open_feature_source``'s
    rules, decided without opening one)."""
    f, p = cfg.features, cfg.parallel
    ok, split, reason = cache_decision(model)
    spec = model_spec(model)
    per_frame = 2 * (model.vision_patches_per_frame() * spec.vision.hidden if split and spec.vision
                     else model.tokens_per_frame(0) * (spec.projector[-1].out_features if spec.projector else 0))
    size = frames * per_frame
    why = reason
    if f.cache == "off":
        ok, why = False, "features.cache=off"
    elif p.backend == "deepspeed" and p.deepspeed_zero_stage == 3:
        ok, why = False, "feature cache off under DeepSpeed ZeRO-3"
    elif ok:
        root = Path(f.cache_dir) if f.cache_dir else Path(cfg.output_dir) / "feature_cache"
        while not root.exists() and root != root.parent:
            root = root.parent
        limit = min(f.max_gib * 2 ** 30, 0.9 * shutil.disk_usage(root).free)
        if size > limit:
            ok, why = False, f"feature cache off: {pm.gib(size):.1f} GiB over the limit {pm.gib(limit):.1f} GiB"
    if f.cache == "on" and not ok:
        assumptions.append(f"features.cache=on would stop the run: {why}")
    if ok:
        assumptions.append("feature cache warm (filled by `vlmtrain cache` or the first epoch): the cached "
                           "producers never run; the first epoch of a cold cache also encodes every frame once")
    out = {"used": ok, "split": split and ok, "reason": why, "bytes_per_frame": per_frame, "frames": frames,
           "disk_bytes": size, "disk_bytes_all_ranks": size * world if world > 1 else size}
    if spatial_branch(model) is not None:
        s_size = frames * spatial_bytes_per_frame(model)
        s_used = f.cache != "off" and not (p.backend == "deepspeed" and p.deepspeed_zero_stage == 3)
        out["spatial"] = {"used": s_used, "bytes_per_frame": spatial_bytes_per_frame(model), "disk_bytes": s_size}
        if s_used:
            assumptions.append("spatial feature cache warm: the spatial encoder never runs (a cold first epoch "
                               "runs it once per distinct frame)")
    return out


def _bench_mfu(cfg: RunConfig, gpu: str) -> tuple[Optional[float], str]:
    """(the MFU ``vlmtrain bench`` measured for this config on this GPU kind, why it is or is not used)."""
    path = Path(cfg.output_dir) / "bench.json"
    if not path.is_file():
        return None, f"no {path}"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{path} unreadable ({e})"
    measured_on = str(record.get("machine", {}).get("gpu", "CPU"))
    c = record.get("config", {})
    want = {"family": cfg.model.family, "packing": cfg.data.packing, "precision": cfg.train.precision,
            "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum}
    differs = [k for k, v in want.items() if c.get(k) != v]
    if record.get("mfu") is None:
        return None, f"{path} has no MFU (measured on {measured_on})"
    if gpu.split("-")[0] not in measured_on.lower():
        return None, f"{path} was measured on {measured_on}, not {gpu}"
    if differs:
        return None, f"{path} was measured with another config ({', '.join(differs)})"
    return float(record["mfu"]), f"measured by vlmtrain bench on {measured_on} ({path})"


def _parameters(model) -> dict:
    out = {}
    for part, params in model_parts(model).items():
        out[part] = {"total": sum(p.numel() for _, p in params),
                     "trainable": sum(p.numel() for _, p in params if p.requires_grad),
                     "lora": sum(p.numel() for n, p in params if p.requires_grad and is_lora_param(n))}
    total = {k: sum(v[k] for v in out.values()) for k in ("total", "trainable", "lora")}
    out["all"] = {**total, "lora_share_of_trainable": round(total["lora"] / max(total["trainable"], 1), 4),
                  "lora_share_of_total": round(total["lora"] / max(total["total"], 1), 6)}
    return out


def _dtypes(cfg: RunConfig, backend: str) -> tuple[int, int]:
    """(bytes of a compute-time parameter, bytes of a matmul output) under ``backend`` on a GPU."""
    bf16 = cfg.train.precision == "bf16"
    if backend.startswith("zero"):
        return (2, 2) if bf16 else (4, 4)
    if backend == "fsdp2" and cfg.parallel.fsdp_mixed_precision in ("auto", "bf16"):
        return 2, 2  # auto means bf16 on CUDA
    return 4, (2 if bf16 else 4)


def _activations(model, micro: list, cfg: RunConfig, backend: str, parts: tuple[str, ...]) -> dict:
    """Activation bytes of the largest micro-batch, as configured and without / with checkpointing
    of ``parts``."""
    params, compute = _dtypes(cfg, backend)
    candidates = sorted(micro, key=lambda m: m.tokens)[-3:] + sorted(micro, key=lambda m: m.frames)[-3:]
    out = {}
    for name, ckpt in (("configured", tuple(cfg.train.grad_checkpointing)), ("no_checkpointing", ()),
                       ("checkpointing", parts)):
        spec = model_spec(model, ckpt)
        out[name] = max((activation_bytes(spec, m, compute, params) for m in candidates),
                        key=lambda r: r["total"])
    return out


def build_plan_report(cfg: RunConfig, gpus: int = 1, nodes: int = 1, gpu: str = "h100",
                      mfu: Optional[float] = None) -> dict:
    """The plan of ``cfg`` on ``nodes`` x ``gpus`` GPUs of kind ``gpu`` (see the module docstring)."""
    check_plan_args(gpus, nodes, gpu, mfu)
    world = gpus * nodes
    assumptions: list[str] = []
    model, how = plan_model(cfg)
    data = plan_data(cfg, model)
    cache = _feature_cache(cfg, model, len(data.frames), world, assumptions)
    plan = build_world_plan(cfg, data, model, world, cache["used"])
    run = resolve_steps(cfg, plan, world)
    contents = step_contents(plan, data, model, world, cache["used"], cache["split"])
    flops_model = run_flops(model, _Source(cache["used"], cache["split"]))
    if flops_model is None:
        raise ConfigError(f"model.family={cfg.model.family}: no FLOPs shape rule for this architecture")
    spatial_cached = cache.get("spatial", {}).get("used", False)
    step_flops = [sum(flops_model.step(d, u, 0 if cache["used"] else u, lab, 0 if spatial_cached else u)
                      for d, u, lab in zip(contents.docs[i], contents.unique[i], contents.labels[i]))
                  for i in range(len(contents.steps))]
    peak = peak_flops(GPUS[gpu].name, "bf16" if cfg.train.precision == "bf16" else "fp32")
    bench_mfu, bench_why = _bench_mfu(cfg, gpu)
    used_mfu = mfu if mfu is not None else (bench_mfu if bench_mfu is not None else DEFAULT_MFU)
    mfu_source = ("--mfu" if mfu is not None else bench_why if bench_mfu is not None
                  else f"assumed ({bench_why}); pass --mfu or run vlmtrain bench on the GPU")
    if mfu is None and bench_mfu is None:
        assumptions.append(f"MFU {DEFAULT_MFU} assumed for a {gpu} ({bench_why})")
    mean_flops = sum(step_flops) / len(step_flops)
    step_s = mean_flops / (world * peak * used_mfu)
    if step_s < 0.05:
        assumptions.append(f"a predicted step of {step_s * 1e3:.2g} ms is below what kernel launches, the "
                           "optimizer and data loading cost: a model this small does not reach a large-model "
                           "MFU; measure it with vlmtrain bench")
    samples = [sum(s) for s in contents.samples]
    per_micro = sum(samples) / len(samples) / (world * cfg.train.grad_accum)
    report = {
        "config": {"output_dir": cfg.output_dir, "family": cfg.model.family, "precision": cfg.train.precision,
                   "backend": cfg.parallel.backend, "model_built_on": how},
        "hardware": {"gpu": gpu, "gpu_name": GPUS[gpu].name, "gpus_per_node": gpus, "nodes": nodes,
                     "world_size": world, "memory_gib": GPUS[gpu].memory_gib, "peak_flops": peak},
        "parameters": _parameters(model),
        "data": {**sample_stats(data), "packing": packing_stats(plan)},
        "batch": {"micro_batch_samples_per_device": round(per_micro, 2), "grad_accum": cfg.train.grad_accum,
                  "ranks": world, "global_batch": cfg.train.batch_size,
                  "samples_per_step": round(sum(samples) / len(samples), 2),
                  "steps_per_epoch": plan.steps_per_epoch, "total_steps": run.train.steps,
                  "epochs": round(run.train.steps / plan.steps_per_epoch, 3)},
        "compute": {"flops_per_step": round(mean_flops), "flops_per_step_min": min(step_flops),
                    "flops_per_step_max": max(step_flops), "steps_counted": len(step_flops),
                    "flops_per_step_by_step": step_flops, "mfu": used_mfu, "mfu_source": mfu_source,
                    "step_s": step_s, "epoch_s": step_s * plan.steps_per_epoch, "total_s": step_s * run.train.steps},
        "feature_cache": cache,
    }
    report["memory"] = memory_report(cfg, model, contents.micro, world, gpu)
    report["assumptions"] = assumptions + _standard_assumptions(cfg, gpu)
    return report


def backend_row(p) -> str:
    """The memory-table row of the configured backend."""
    if p.backend in ("none", "ddp", "fsdp2"):
        return "fsdp2" if p.backend == "fsdp2" else "ddp"
    name = f"zero{p.deepspeed_zero_stage}"
    name += "+offload_opt" if p.deepspeed_offload_optimizer == "cpu" else ""
    return name + ("+offload_param" if p.deepspeed_offload_param == "cpu" else "")


def rank_memory(name: str, infos, groups, world: int, rank: int, cfg: RunConfig) -> pm.RankMemory:
    """Rank ``rank``'s model-state memory under backend row ``name`` (``ddp``, ``fsdp2``, ``zero2``,
    ``zero3``, with ``+offload_opt`` / ``+offload_param``)."""
    p, flags = cfg.parallel, name.split("+")
    bf16 = 2 if cfg.train.precision == "bf16" else 4
    if flags[0] == "ddp":
        return pm.ddp(infos)
    if flags[0] == "fsdp2":
        return pm.fsdp2(infos, world, rank, 2 if p.fsdp_mixed_precision in ("auto", "bf16") else 4)
    if flags[0] == "zero2":
        return pm.zero2(infos, groups, world, rank, bf16, p.deepspeed_reduce_bucket_size, p.deepspeed_overlap_comm,
                        "offload_opt" in flags)
    return pm.zero3(infos, groups, world, bf16, p.deepspeed_stage3_param_persistence_threshold,
                    p.deepspeed_reduce_bucket_size, p.deepspeed_stage3_prefetch_bucket_size,
                    "offload_opt" in flags, "offload_param" in flags)


def state_inputs(cfg: RunConfig, model) -> tuple[list, list, dict]:
    """(parameter infos, optimizer groups as indices, blocks per part) of ``model`` as ``cfg`` trains it."""
    from vlmtrain.parallel.parallelize import transformer_blocks
    from vlmtrain.train.optim import build_optimizer

    blocks = transformer_blocks(model)
    infos, index = pm.param_infos(model, blocks)
    return infos, pm.optimizer_groups(build_optimizer(model, cfg.optim), index), blocks


ROWS = ("ddp", "fsdp2", "zero2", "zero3", "zero2+offload_opt", "zero3+offload_opt+offload_param")


def memory_report(cfg: RunConfig, model, micro: list, world: int, gpu: str) -> dict:
    """Per-rank memory for every backend row (the largest rank), with activations and whether it fits."""
    infos, groups, blocks = state_inputs(cfg, model)
    parts = tuple(p for p in ("vision", "llm") if p in blocks)
    configured = backend_row(cfg.parallel)
    capacity = GPUS[gpu].memory_gib * 2 ** 30
    out = {}
    for name in ROWS + ((configured,) if configured not in ROWS else ()):
        mem = max((rank_memory(name, infos, groups, world, r, cfg) for r in range(world)),
                  key=lambda m: m.states + m.buffers)
        acts = _activations(model, micro, cfg, name.split("+")[0], parts)
        total = mem.states + mem.buffers + acts["configured"]["total"]
        out[name] = {"parameters": mem.parameters, "gradients": mem.gradients, "optimizer": mem.optimizer,
                     "buffers": mem.buffers, "host": mem.host, "activations": acts["configured"]["total"],
                     "activations_no_checkpointing": acts["no_checkpointing"]["total"],
                     "activations_checkpointing": acts["checkpointing"]["total"],
                     "activation_parts": acts["configured"], "total": total,
                     "fits": total <= HEADROOM * capacity, "configured": name == configured}
    return out


def _standard_assumptions(cfg: RunConfig, gpu: str) -> list[str]:
    return [
        f"peak FLOP/s: the dense {('bf16' if cfg.train.precision == 'bf16' else 'fp32')} peak "
        f"(train.precision) of a {GPUS[gpu].name} (metrics/flops.py); FLOPs counted as training logs them "
        "(no recompute, no padding)",
        f"fits: total <= {HEADROOM:.0%} of {GPUS[gpu].memory_gib} GiB (the rest: CUDA context, allocator "
        "caching and fragmentation, NCCL buffers)",
        "activations: the largest micro-batch of the counted steps (by LM positions or frames); analytic "
        "model of what autograd saves (tools/plan_activations.py), validated on CPU in fp32 and bf16",
        "parameters / gradients / optimizer: exact layouts of torch DDP, FSDP2 and DeepSpeed ZeRO-2/3 "
        "(tools/plan_memory.py), AdamW with two fp32 moments; the largest rank is shown",
        "buffers (modelled): DeepSpeed reduce buckets (parallel.deepspeed_reduce_bucket_size elements, x2 "
        "with overlap_comm under ZeRO-2); FSDP2 / ZeRO-3 gathered weights (root group or persistent "
        "ones and the two largest blocks)",
        "DeepSpeed under bf16 keeps bf16 weights plus fp32 master copies; torch backends keep fp32 weights "
        "(bf16 is autocast); FSDP2's fsdp_mixed_precision=auto computes in bf16 on CUDA",
        "time: FLOPs per step / (ranks x peak x MFU); data loading and communication are inside the MFU",
    ]

"""The ``parallel`` and ``memory`` sections of the run configuration and their validation.

Kept apart from ``config.py`` (which imports them, so ``from vlmtrain.config import ParallelConfig``
works) because the DeepSpeed keys made one module too long. Every field carries its trailing comment
for ``docs/config.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("none", "ddp", "fsdp2", "deepspeed")


@dataclass
class ParallelConfig:
    """Data parallelism across processes started by torchrun (docs/distributed.md)."""

    backend: str = "none"  # none | ddp | fsdp2 | deepspeed; ddp/fsdp2 without torchrun run as one process, deepspeed needs torchrun (also for one process)
    comm: str = "auto"  # process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: float = 1800.0  # a collective that waits longer than this fails the run instead of hanging it
    ddp_find_unused: bool = False  # ddp: look for parameters without gradients every step (slower; a rank without images is handled without it)
    ddp_bucket_cap_mb: float = 25.0  # ddp: gradient all-reduce bucket size in MiB
    fsdp_mixed_precision: str = "auto"  # fsdp2 parameter dtype in forward/backward: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    fsdp_reduce_dtype: str = "fp32"  # fsdp2 gradient reduce-scatter dtype under bf16: fp32 (exact sums) | bf16 (half the traffic)
    fsdp_reshard_after_forward: bool = True  # fsdp2: free each block's gathered weights after forward and gather again in backward (less memory, more traffic)
    fsdp_shard_parts: list[str] = field(default_factory=lambda: ["vision", "llm"])  # fsdp2: parts whose transformer blocks are sharded one by one (others join the root group; with a feature cache vision always does)
    deepspeed_zero_stage: int = 2  # deepspeed: ZeRO stage 2 (optimizer state and gradients partitioned over ranks) | 3 (parameters too, gathered per module in forward and backward; the feature cache is then off)
    deepspeed_offload_optimizer: str = "none"  # deepspeed: cpu keeps the optimizer state in host memory and steps it there | none
    deepspeed_offload_param: str = "none"  # deepspeed stage 3: cpu keeps the parameter partitions in host memory | none
    deepspeed_reduce_bucket_size: int = 500_000_000  # deepspeed: elements per gradient reduce(-scatter) bucket (smaller: less memory, more collectives)
    deepspeed_allgather_bucket_size: int = 500_000_000  # deepspeed stage 2: elements per all-gather of the updated parameters after the step
    deepspeed_stage3_prefetch_bucket_size: int = 50_000_000  # deepspeed stage 3: elements of parameters gathered ahead of the module that needs them
    deepspeed_stage3_param_persistence_threshold: int = 100_000  # deepspeed stage 3: parameters with fewer elements stay whole on every rank (0: partition all)
    deepspeed_overlap_comm: bool = True  # deepspeed: reduce gradients while backward still runs (needs bucket memory)
    deepspeed_wall_clock_breakdown: bool = False  # deepspeed: time forward, backward, all-reduce and step (deepspeed/*_ms metrics of rank 0; adds synchronisations and a DeepSpeed log line per step)


@dataclass
class MemoryConfig:
    """CUDA memory: allocator setting, synchronised cache emptying (no effect on CPU)."""

    alloc_conf: str = "expandable_segments:True"  # PYTORCH_CUDA_ALLOC_CONF set at start unless the user set PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF ("": leave the default)
    empty_cache_on_retries: bool = False  # call torch.cuda.empty_cache on every rank at the same step when any rank's allocator retries grew
    empty_cache_reserved_gib: float = 0.0  # ... or when any rank's reserved memory passes this many GiB (0: never)


def parallel_problems(p: ParallelConfig, memory: MemoryConfig) -> list[str]:
    """What is wrong with the ``parallel`` and ``memory`` sections, one message per problem (empty: fine;
    part names in ``fsdp_shard_parts`` are checked with the other part lists in ``config.py``)."""
    choices = {
        "parallel.backend": (p.backend, set(BACKENDS)),
        "parallel.comm": (p.comm, {"auto", "nccl", "gloo"}),
        "parallel.fsdp_mixed_precision": (p.fsdp_mixed_precision, {"auto", "bf16", "fp32"}),
        "parallel.fsdp_reduce_dtype": (p.fsdp_reduce_dtype, {"fp32", "bf16"}),
        "parallel.deepspeed_zero_stage": (p.deepspeed_zero_stage, {2, 3}),
        "parallel.deepspeed_offload_optimizer": (p.deepspeed_offload_optimizer, {"none", "cpu"}),
        "parallel.deepspeed_offload_param": (p.deepspeed_offload_param, {"none", "cpu"}),
    }
    problems = [f"{key}={value!r}: expected one of {sorted(allowed)}"
                for key, (value, allowed) in choices.items() if value not in allowed]
    if p.deepspeed_offload_param == "cpu" and p.deepspeed_zero_stage != 3:
        problems.append("parallel.deepspeed_offload_param=cpu needs parallel.deepspeed_zero_stage=3 "
                        "(stage 2 does not partition parameters)")
    positive = {"parallel.timeout_s": p.timeout_s,
                "parallel.deepspeed_reduce_bucket_size": p.deepspeed_reduce_bucket_size,
                "parallel.deepspeed_allgather_bucket_size": p.deepspeed_allgather_bucket_size,
                "parallel.deepspeed_stage3_prefetch_bucket_size": p.deepspeed_stage3_prefetch_bucket_size}
    problems += [f"{key}={value}: must be > 0" for key, value in positive.items() if value <= 0]
    non_negative = {"parallel.deepspeed_stage3_param_persistence_threshold": p.deepspeed_stage3_param_persistence_threshold,
                    "memory.empty_cache_reserved_gib": memory.empty_cache_reserved_gib}
    problems += [f"{key}={value}: must be >= 0" for key, value in non_negative.items() if value < 0]
    return problems

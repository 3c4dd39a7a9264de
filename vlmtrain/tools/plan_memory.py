"""Per-rank model-state memory of ``vlmtrain plan``: parameters, gradients and optimizer state by
backend, from the parameter shapes and the run's real optimizer groups, with each backend's own
layout and padding rules (``tests/tools/test_plan.py`` holds them to the bytes 2-rank CPU runs hold).

The optimizer is ``train/optim.py``'s AdamW: two fp32 moments per trainable element and one fp32
``step`` tensor per parameter tensor (torch) or per parameter group (DeepSpeed's flat partitions).

- **none / ddp**: whole fp32 parameters and gradients (DDP's gradients are views into its all-reduce
  buckets: one copy), whole optimizer state. ``train.precision=bf16`` is autocast: weights stay fp32.
- **fsdp2**: every parameter is cut on dim 0 into ``ceil(rows / N)``-row shards, each rank's shard
  padded to that size (its storage); gradients are the padded shards of the reduce-scatter output;
  the moments are ``zeros_like`` the unpadded local shard (so the last rank may hold fewer).
- **ZeRO-2**: each optimizer group's trainable parameters are flattened into one buffer padded to a
  multiple of ``2 N`` elements (DeepSpeed's ``nccl_start_alignment_factor`` x world size), which every
  rank keeps whole; rank r owns partition r (buffer / N elements) and holds its fp32 master copy and
  moments; its gradient buffer holds *every parameter that touches the partition, whole*
  (``grads_in_partition``). Parameters and gradients are bf16 under ``train.precision=bf16``.
- **ZeRO-3**: every parameter is split into ``ceil(numel / N)``-element partitions; parameters of at
  most ``deepspeed_stage3_param_persistence_threshold`` elements also stay whole on every rank after
  their first gather (as views of their padded all-gather buffer: ``N x ceil(numel / N)``
  elements); gradients, fp32 master copies (always a copy: DeepSpeed compares the device to
  a string, so it never shares the fp32 partition) and moments are per partition.

``buffers`` (modelled, not measured) are the transient working sets: DeepSpeed's reduce buckets
(``reduce_bucket_size`` elements, twice with ``overlap_comm`` under ZeRO-2), FSDP2's and ZeRO-3's
gathered parameters (the root group / persistent ones and the two largest blocks: the one running and
the one prefetched). CPU offload moves the master copies and moments (``offload_optimizer``) and the
parameter partitions (``offload_param``) to host memory (``host``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

FP32 = 4


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor: elements, rows (dim 0) and whether it trains."""

    numel: int
    rows: int
    trainable: bool
    block: int = -1  # index of the transformer block it belongs to (-1: none, the FSDP2 root group)


@dataclass
class RankMemory:
    """Bytes one rank holds on the device (and on the host with offload)."""

    backend: str
    parameters: int
    gradients: int
    optimizer: int
    buffers: int = 0
    host: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def states(self) -> int:
        """Parameters + gradients + optimizer state on the device."""
        return self.parameters + self.gradients + self.optimizer


def param_infos(model: nn.Module, blocks: dict[str, list[nn.Module]]) -> tuple[list[ParamInfo], dict[int, int]]:
    """(every parameter of ``model`` in order, id(param) -> its index), tagged with its block."""
    block_of: dict[int, int] = {}
    for i, block in enumerate(b for part in blocks.values() for b in part):
        for p in block.parameters():
            block_of[id(p)] = i
    infos, index = [], {}
    for p in model.parameters():
        index[id(p)] = len(infos)
        infos.append(ParamInfo(p.numel(), int(p.shape[0]) if p.ndim else 1, p.requires_grad, block_of.get(id(p), -1)))
    return infos, index


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def ddp(params: Sequence[ParamInfo]) -> RankMemory:
    """none / ddp: everything whole on every rank."""
    train = [p for p in params if p.trainable]
    t = sum(p.numel for p in train)
    return RankMemory("ddp", sum(p.numel for p in params) * FP32, t * FP32, 2 * t * FP32 + FP32 * len(train))


def fsdp2(params: Sequence[ParamInfo], world: int, rank: int, compute_bytes: int = FP32) -> RankMemory:
    """fsdp2 (``fully_shard`` per block, then the root): see the module docstring."""
    def padded(p: ParamInfo) -> int:
        return _ceil(p.rows, world) * (p.numel // max(p.rows, 1))

    def local(p: ParamInfo) -> int:
        rows = _ceil(p.rows, world)
        return max(0, min(rows, p.rows - rank * rows)) * (p.numel // max(p.rows, 1))

    train = [p for p in params if p.trainable]
    per_block: dict[int, int] = {}
    for p in params:
        per_block[p.block] = per_block.get(p.block, 0) + p.numel
    root = per_block.pop(-1, 0)
    gathered = (root + sum(sorted(per_block.values())[-2:])) * compute_bytes
    return RankMemory("fsdp2", sum(padded(p) for p in params) * FP32, sum(padded(p) for p in train) * FP32,
                      2 * sum(local(p) for p in train) * FP32 + FP32 * len(train), buffers=gathered)


def zero2(params: Sequence[ParamInfo], groups: Sequence[Sequence[int]], world: int, rank: int, param_bytes: int,
          reduce_bucket: int, overlap_comm: bool, offload_optimizer: bool = False) -> RankMemory:
    """DeepSpeed ZeRO-2: see the module docstring."""
    in_groups = {i for g in groups for i in g}
    flat = grads = master = 0
    for g in groups:
        sizes = [params[i].numel for i in g]
        aligned = _ceil(sum(sizes), 2 * world) * 2 * world
        part = aligned // world
        start, end = part * rank, part * (rank + 1)
        cur = covered = touching = 0
        for n in sizes:
            if start <= cur < end or cur < start < cur + n:
                touching += n
                covered += min(cur + n, end) - max(cur, start)
            cur += n
        flat += aligned
        grads += touching + (part - covered)  # zero padding of a partition its parameters do not fill
        master += part
    frozen = sum(p.numel for i, p in enumerate(params) if i not in in_groups)
    optimizer = 3 * master * FP32 + FP32 * len(groups)  # fp32 master + two moments, one step per group
    out = RankMemory("zero2", (flat + frozen) * param_bytes, grads * param_bytes, optimizer,
                     buffers=reduce_bucket * param_bytes * (2 if overlap_comm else 1))
    if offload_optimizer:  # master, moments and an fp32 gradient partition live in host memory
        out.host, out.optimizer, out.gradients = out.optimizer + master * FP32, 0, 0
        out.backend += "+offload_opt"
    return out


def zero3(params: Sequence[ParamInfo], groups: Sequence[Sequence[int]], world: int, param_bytes: int,
          persistence: int, reduce_bucket: int, prefetch_bucket: int, offload_optimizer: bool = False,
          offload_param: bool = False) -> RankMemory:
    """DeepSpeed ZeRO-3: see the module docstring."""
    part = [_ceil(p.numel, world) for p in params]
    # A gathered parameter is a view of its all-gather buffer: N padded partitions.
    persistent = sum(_ceil(p.numel, world) * world for p in params if p.numel <= persistence)
    train_part = sum(part[i] for g in groups for i in g)
    optimizer = 3 * train_part * FP32 + FP32 * len(groups)
    per_block: dict[int, int] = {}
    for p in params:
        if p.block >= 0 and p.numel > persistence:
            per_block[p.block] = per_block.get(p.block, 0) + p.numel
    gathered = (sum(sorted(per_block.values())[-2:]) + min(prefetch_bucket, max(per_block.values(), default=0)))
    out = RankMemory("zero3", (sum(part) + persistent) * param_bytes, train_part * param_bytes, optimizer,
                     buffers=reduce_bucket * param_bytes + gathered * param_bytes)
    if offload_optimizer:  # master, moments and the gradient partitions (fp32) live in host memory
        out.host, out.optimizer, out.gradients = out.optimizer + train_part * FP32, 0, 0
        out.backend += "+offload_opt"
    if offload_param:
        out.host += sum(part) * param_bytes
        out.parameters = persistent * param_bytes
        out.backend += "+offload_param"
    return out


def optimizer_groups(optimizer, index: dict[int, int]) -> list[list[int]]:
    """The optimizer's groups as parameter indices (``param_infos`` order)."""
    return [[index[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def gib(n: float) -> float:
    """Bytes as GiB."""
    return n / float(1 << 30)

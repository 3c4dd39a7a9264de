#!/bin/bash
# Multi-node `vlmtrain train` under SLURM: one torchrun per node, all meeting at the first node.
#
#   sbatch --nodes 4 scripts/slurm_train.sh --config configs/my_run.yaml parallel.backend=fsdp2
#
# Every argument goes to `vlmtrain train`. The run's output_dir must be on a file system all nodes
# see. Adjust the #SBATCH lines (partition, GPUs, time) and the NCCL block to your cluster;
# docs/distributed.md explains each setting.
#SBATCH --job-name=vlmtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # one torchrun per node; it starts GPUS_PER_NODE ranks
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

# NCCL: name the fabric instead of letting NCCL guess (uncomment what applies to your cluster).
# export NCCL_SOCKET_IFNAME=ib0          # interface for bootstrap/socket traffic (e.g. ib0, eth0, ^lo,docker)
# export NCCL_IB_HCA=mlx5_0,mlx5_1       # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1               # no working InfiniBand: use TCP
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}    # INFO prints the transports chosen (first stop when a job hangs)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed collective ends the job, not hangs it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$HEAD_NODE:$RDZV_PORT" \
    --rdzv_id "$SLURM_JOB_ID" \
    -m vlmtrain.cli train "$@"

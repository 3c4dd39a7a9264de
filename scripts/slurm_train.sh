#!/bin/bash
# Multi-node `vlmtrain train` under SLURM: one torchrun per node, all meeting at the first node.
#
#   sbatch --nodes 4 scripts/slurm_train.sh --config configs/my_run.yaml parallel.backend=fsdp2
#
# Every argument goes to `vlmtrain train`. The run's output_dir must be on a file system all nodes
# see. Adjust the #SBATCH lines (partition, GPUs, time) and the NCCL block to your cluster;
# docs/distributed.md explains each setting.
#
# Preemption: SLURM sends SIGUSR1 to this script 5 minutes before the time limit (--signal below);
# the trap passes it to every rank (the children of each node's torchrun), each rank finishes its
# step, they write one checkpoint together and exit 0; the job then requeues itself and the next
# start resumes from that checkpoint (train.resume=true is added for you).
#SBATCH --job-name=vlmtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # one torchrun per node; it starts GPUS_PER_NODE ranks
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=B:USR1@300            # SIGUSR1 to this script 300 s before the limit
#SBATCH --requeue
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

PREEMPTED=0
forward_signal() {  # SIGUSR1 to the ranks (torchrun's children) on every node; torchrun itself would die of it
    PREEMPTED=1
    srun --overlap --nodes "$SLURM_JOB_NUM_NODES" --ntasks-per-node 1 \
        bash -c 'pkill -USR1 -P "$(pgrep -o -f torch.distributed.run\|torchrun)"' || true
}
trap forward_signal USR1

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$HEAD_NODE:$RDZV_PORT" \
    --rdzv_id "$SLURM_JOB_ID" \
    -m vlmtrain.cli train "$@" train.resume=true &
TRAIN_PID=$!
wait "$TRAIN_PID" || true   # returns when the trap runs: wait again for the checkpoint and exit
wait "$TRAIN_PID"; STATUS=$?
if [ "$PREEMPTED" = 1 ] && [ "$STATUS" = 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"   # the next start resumes from the checkpoint just written
fi
exit "$STATUS"

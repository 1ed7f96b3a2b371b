#!/usr/bin/env bash
# Train on several nodes with 8 GPUs each: srun starts one torchrun per node; they meet through the
# c10d rendezvous on the first node of the allocation and start 8 DDP workers each.
#   mkdir -p logs && sbatch scripts/train_multinode.sh                    # 2 nodes x 8 GPUs
#   sbatch --nodes=4 scripts/train_multinode.sh train.max_steps=20000     # 4 nodes x 8 GPUs
# Command-line sbatch options override the #SBATCH lines below. Every run passes --resume auto, so a
# requeued or resubmitted job continues from its newest checkpoint. Env knobs: scripts/slurm_common.sh.
#SBATCH --job-name=bytegpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

# sbatch runs a copy of this file from its spool folder: find the repository from where it was submitted
cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}" && [ -f scripts/slurm_common.sh ] \
  || { echo "error: run sbatch from the repository root, or set REPO_DIR=/path/to/repo" >&2; exit 2; }
source scripts/slurm_common.sh

#!/usr/bin/env bash
# Train on one node with 8 GPUs: srun starts torchrun, torchrun starts 8 DDP workers.
#   mkdir -p logs && sbatch scripts/train_8gpu.sh                        # from the repository root
#   CONFIG=configs/my.yaml sbatch scripts/train_8gpu.sh train.max_steps=20000 train.lr=6.0e-4
#   NPROC=4 sbatch --gpus-per-node=4 scripts/train_8gpu.sh               # 4 GPUs
#   NPROC=2 DEVICE=cpu sbatch --gpus-per-node=0 --cpus-per-task=2 scripts/train_8gpu.sh   # CPU, gloo
# Command-line sbatch options override the #SBATCH lines below. Every run passes --resume auto, so a
# requeued or resubmitted job continues from its newest checkpoint. Env knobs: scripts/slurm_common.sh.
#SBATCH --job-name=bytegpt
#SBATCH --nodes=1
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

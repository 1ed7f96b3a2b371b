# shellcheck shell=bash
# The body shared by scripts/train_8gpu.sh and scripts/train_multinode.sh; sourced from the repository
# root inside an sbatch job, not run by itself. One torchrun per node (srun), each starting NPROC
# workers that meet through torchrun's c10d rendezvous on the allocation's first node.
#
# Environment (all optional):
#   CONFIG       config file (default configs/default_config.yaml; --config FILE as an argument also works)
#   NPROC        training processes per node (default 8: one per GPU)
#   DEVICE       --device for train_ddp.py, e.g. cpu to run NPROC gloo processes (default: CUDA if present)
#   MASTER_PORT  rendezvous port on the first node (default 20000 + job id % 20000, so jobs sharing
#                a node do not collide)
#   PYTHON       the interpreter with torch installed (default python)
#   TORCHRUN_ARGS  extra torchrun flags
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun gives its workers to save and exit after a SIGTERM
#                before SIGKILL (torch 2.12+; default here 120, the lead of #SBATCH --signal; torch's own: 30)
# Arguments after the script name go to train_ddp.py: overrides such as train.max_steps=100.
#
# Preemption: SLURM sends SIGUSR1 to this shell (#SBATCH --signal=B:USR1@120). The trap sends SIGTERM
# to the training step; the workers finish their optimizer step, save a checkpoint and exit 75.
# The job then requeues itself and the next run continues with --resume auto.
# torchrun, signalled too, SIGKILLs its workers 30 s later by default, and a step, an evaluation and the save
# of a large model take longer: torch 2.12+ waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds instead (older torch
# ignores it and keeps 30 s). SLURM's own kill comes at the time limit plus KillWait, so the signal's lead is
# the window that counts; raise both together (sbatch --signal=B:USR1@600, TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600).

: "${SLURM_JOB_ID:?submit this script with sbatch (or salloc), it needs a SLURM allocation}"
CONFIG=${CONFIG:-configs/default_config.yaml}
NPROC=${NPROC:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_JOB_NUM_NODES node(s) x" \
     "$NPROC processes, rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG, $(date)"

export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

PREEMPTED=0
INTERRUPTED=0
# shellcheck disable=SC2329  # called by the trap below
on_usr1() {
  PREEMPTED=1 INTERRUPTED=1
  echo "SIGUSR1: the time limit is near; asking the training to save a checkpoint and stop ($(date))"
  # reaches every process of the job's steps, torchrun's workers included, but not this shell;
  # the workers never see SIGUSR1, which would kill a torchrun that does not handle it
  scancel --signal=TERM "$SLURM_JOB_ID"
}
trap on_usr1 USR1

# srun of some SLURM releases (22.05 among them) does not inherit sbatch's --cpus-per-task: without it
# torchrun and all its workers may be bound to one core
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
  "${PYTHON:-python}" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" ${TORCHRUN_ARGS:-} \
  train_ddp.py --config "$CONFIG" ${DEVICE:+--device "$DEVICE"} --resume auto "$@" &
STEP=$!
# bash runs a trap only between commands, hence srun in the background; a trap also ends `wait`
# early, so wait again until the step itself has ended (bash keeps its exit status)
while :; do
  INTERRUPTED=0
  wait "$STEP"
  rc=$?
  [ "$INTERRUPTED" = 1 ] || break
done

if [ "$PREEMPTED" = 1 ]; then
  echo "requeueing job $SLURM_JOB_ID; its next run resumes from the last checkpoint ($(date))"
  scontrol requeue "$SLURM_JOB_ID"
fi
echo "training step exited with code $rc ($(date))"
exit "$rc"

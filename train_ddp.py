"""Train data-parallel, DDP or (distributed.strategy=fsdp) FSDP2: one process per GPU (or CPU process with gloo).

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/default_config.yaml
    # two nodes, run on each (c10d rendezvous on the first node):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_id=job1 \\
        --rdzv_endpoint=node0:29500 train_ddp.py --config configs/default_config.yaml
    sbatch scripts/train_8gpu.sh                        # SLURM; see the README
    torchrun --standalone --nproc_per_node=2 train_ddp.py --device cpu train.batch_size=4   # CPU, gloo
    torchrun --standalone --nproc_per_node=8 train_ddp.py distributed.strategy=fsdp       # FSDP2 (utils/distributed/parallel.py)

Same loop, config, checkpoints and exit codes as train_single.py; train.batch_size is per process.
A SIGTERM or Ctrl-C to torchrun makes the workers finish the step, save and exit 75, but torchrun SIGKILLs
them 30 s later: give a large model's save more time with TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120 in torchrun's
environment (or --shutdown-timeout=120; torch 2.12+, older torch keeps 30 s: signal the workers instead).
"""

import sys

from utils.train.cli import parse_cli
from utils.distributed.process_group import process_group
from utils.errors import run_cli
from utils.distributed.parallel import parallelize
from utils.train.run import run_name, run_training


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        cfg, args = parse_cli(argv, "Train the byte-level GPT with DDP (launch with torchrun or srun).")
        with process_group(cfg.distributed, args.device) as info:
            return run_training(cfg, info, args.resume, run_name=run_name(args.config),
                                wrap=lambda model, precision: parallelize(model, info, cfg.distributed, precision))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

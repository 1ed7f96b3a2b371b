"""Train on one device (a GPU if present, else the CPU).

    python train_single.py --config configs/default_config.yaml
    python train_single.py --config configs/cpu_quickstart.yaml --device cpu train.max_steps=50
    python train_single.py --config configs/default_config.yaml --resume auto   # continue the run
    python train_single.py --print-config                                       # every key, documented

Overrides are `section.key=value` after the flags. Exit codes: 0 done (or train.stop_at_step
reached), 75 stopped by SIGTERM/SIGUSR1/Ctrl-C after saving a checkpoint, 2 bad input.
"""

import sys

from utils.train.cli import parse_cli
from utils.device import resolve_device
from utils.distributed.process_group import DistInfo
from utils.errors import run_cli
from utils.train.run import run_name, run_training


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        cfg, args = parse_cli(argv, "Train the byte-level GPT on one device.")
        info = DistInfo(rank=0, local_rank=0, world_size=1, device=resolve_device(args.device, 0), backend=None)
        return run_training(cfg, info, args.resume, run_name=run_name(args.config))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

"""Convert a sharded checkpoint folder (distributed.strategy=fsdp) into the single-file format.

    python -m scripts.convert_checkpoint --checkpoint checkpoints/step_0005000 --out model.pt
    python inference.py --checkpoint model.pt --prompt "Once upon a time"

Runs in one process on the CPU, whatever the number of ranks that wrote the folder. The file holds
the full weights, the config and the trainer counters, so inference.py, scripts/evaluate.py and
scripts/export_hf.py read it unchanged; it has no optimizer state (to continue training, resume
from the folder itself: --resume checkpoints/step_0005000).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from utils.errors import UserError, run_cli
from utils.checkpoint.sharded import convert


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Convert a sharded (DCP) checkpoint folder to one .pt file.")
    p.add_argument("--checkpoint", required=True, help="a step_NNNNNNN (or best_model) folder")
    p.add_argument("--out", required=True, help="the .pt file to write (replaced atomically)")
    args = p.parse_args(argv)

    def body() -> int:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise UserError(f"folder {out.parent} does not exist; create it or choose another --out")
        convert(args.checkpoint, out)
        print(f"wrote {out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

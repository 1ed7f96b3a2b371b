"""Write any checkpoint (a sharded folder of distributed.strategy=fsdp, or a file) as one weights-only file.

    python -m scripts.convert_checkpoint --checkpoint checkpoints/step_0005000 --out model.pt

Runs in one process on the CPU, whatever the number of ranks that wrote the folder. The file holds
the full weights, the config and the trainer counters and no optimizer state: small, and read
without DCP. inference.py, scripts/evaluate.py and scripts/export_hf.py read the folder itself
too; to continue training, resume from the folder (--resume checkpoints/step_0005000).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from utils.errors import ArgumentParser, UserError, run_cli, utf8_text
from utils.checkpoint.reader import convert
from utils.outputs import check_output


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description="Convert a sharded (DCP) checkpoint folder to one .pt file.")
    p.add_argument("--checkpoint", type=utf8_text, required=True,
                   help="a step_NNNNNNN (or best_model) folder, or a .pt file")
    p.add_argument("--out", type=utf8_text, required=True, help="the .pt file to write (replaced atomically)")

    def body() -> int:
        args = p.parse_args(argv)
        out = Path(args.out)
        check_output(out, [args.checkpoint])
        if not out.parent.is_dir():
            raise UserError(f"folder {out.parent} does not exist; create it or choose another --out")
        if out.is_dir():
            raise UserError(f"--out {out} is a folder; name the file to write, e.g. --out {out / 'model.pt'}")
        convert(args.checkpoint, out)
        print(f"wrote {out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

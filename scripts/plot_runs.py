"""Plot train and validation loss of runs, from their TensorBoard event files or a nanoGPT log.

    python -m scripts.plot_runs logs/ --out runs.png                      # every run under logs/
    python -m scripts.plot_runs "logs/tensorboard/2026*" --x time           # a glob; x = seconds of training
    python -m scripts.plot_runs ours=logs/tensorboard/RUN nanoGPT=nanogpt.log --x both --out cmp.png

Each argument is a folder (every folder below it that holds event files is one run, labelled by its
name, the run name of its log file), a glob of such folders, or a saved nanoGPT training log (its
`step N: train loss X, val loss Y` and `iter N: ... time Tms` lines); `LABEL=` before it renames
the line. Writes OUT (PNG) and the same figure as SVG next to it. `--x step` plots against
optimizer steps, `--x time` against seconds of training (the trainer's train/seconds, which excludes
start-up and evaluation; for a nanoGPT log, the sum of its iteration times without the iterations
that evaluated), `--x both` side by side. The right axis gives the loss in bits per byte (per character
for a nanoGPT log of ASCII text). Needs matplotlib (requirements-dev.txt); training never imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from utils.errors import ArgumentParser, UserError, run_cli
from utils.metrics.curves import plot, read_runs


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description="Plot train/val loss of runs (TensorBoard event files or nanoGPT logs).")
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="a log folder, a glob of them, or a nanoGPT log")
    p.add_argument("--x", choices=["step", "time", "both"], default="step", help="x axis (default: step)")
    p.add_argument("--out", default="runs.png", help="PNG to write; an SVG of the same name is written too")
    p.add_argument("--title", default="")
    p.add_argument("--ymax", type=float, default=None, help="top of the loss axis (the first steps' loss is high)")
    p.add_argument("--size", default="10x4", metavar="WxH", help="figure size in inches (default 10x4)")
    p.add_argument("--dpi", type=int, default=100)

    def body() -> int:
        args = p.parse_args(argv)
        try:
            width, height = (float(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise UserError(f"--size must look like 10x4 (inches), got {args.size!r}") from None
        if width <= 0 or height <= 0 or args.dpi <= 0:
            raise UserError("--size and --dpi must be positive")
        curves = [c for spec in args.runs for c in read_runs(spec)]
        written = plot(curves, args.x, Path(args.out), args.title, args.ymax, width, height, args.dpi)
        print(f"wrote {' and '.join(map(str, written))} ({len(curves)} run(s))")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

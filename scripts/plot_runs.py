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

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from utils.errors import ArgumentParser, UserError, number, run_cli, utf8_text
from utils.metrics.curves import plot, read_runs, run_paths
from utils.outputs import check_output

INCHES = number(float, 0, 100, "inches", above=True)
MAX_PIXELS = 1 << 16  # matplotlib's Agg draws fewer pixels than this a side


def figure_size(text: str) -> tuple[float, float]:
    """'10x4' -> (10.0, 4.0) inches."""
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"must look like 10x4 (width x height in inches), got {text!r:.40}")
    return INCHES(parts[0]), INCHES(parts[1])


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description="Plot train/val loss of runs (TensorBoard event files or nanoGPT logs).")
    p.add_argument("runs", type=utf8_text, nargs="+", metavar="[LABEL=]RUN",
                   help="a log folder, a glob of them, or a nanoGPT log")
    p.add_argument("--x", choices=["step", "time", "both"], default="step", help="x axis (default: step)")
    p.add_argument("--out", type=utf8_text, default="runs.png",
                   help="PNG to write; an SVG of the same name is written too")
    p.add_argument("--title", type=utf8_text, default="")
    p.add_argument("--ymax", type=number(float, 0, 1e4, "nats per byte", above=True), default=None,
                   help="top of the loss axis (the first steps' loss is high)")
    p.add_argument("--size", type=figure_size, default=(10.0, 4.0), metavar="WxH",
                   help="figure size in inches (default 10x4)")
    p.add_argument("--dpi", type=number(int, 1, 1200, "dots per inch"), default=100)

    def body() -> int:
        args = p.parse_args(argv)
        width, height = args.size
        if max(width, height) * args.dpi >= MAX_PIXELS:
            raise UserError(f"--size {width:g}x{height:g} at --dpi {args.dpi} is an image of "
                            f"{width * args.dpi:,.0f}x{height * args.dpi:,.0f} pixels; matplotlib draws fewer than "
                            f"{MAX_PIXELS:,} a side: ask for a smaller --size or --dpi")
        out = Path(args.out)
        for written in (out, out.with_suffix(".svg")):
            check_output(written, [path for spec in args.runs for path in run_paths(spec)[1]])
        curves = [c for spec in args.runs for c in read_runs(spec)]
        written = plot(curves, args.x, out, args.title, args.ymax, width, height, args.dpi)
        print(f"wrote {' and '.join(map(str, written))} ({len(curves)} run(s))")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

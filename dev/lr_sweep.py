"""Where the best learning rate sits as the model widens: one multiplier on every learning rate at once
(optim.lr, optim.muon_lr and schedule.min_lr), several seeds, at a fixed number of steps, width by width.

    python -m dev.lr_sweep --config configs/shakespeare_cpu.yaml --out records/cpu/DATE-lr-width \\
        --widths 128 256 512 768:1 --seeds 1 2 3 --set train.max_steps=100 train.batch_size=16

A width W is the config's model at dim W, W / head-size heads and the MLP's width scaled with it (the config's
depth and context). Each width starts at the multipliers around the best one of the width before it (1 for the
first) and widens the grid by 2x steps until the best multiplier has a worse one on each side, so the sweep
follows the optimum instead of assuming where it is. `W:N` runs that width with the first N seeds only. Run
again with the same --out, a stopped sweep goes on from its runs.jsonl.
Equal steps, not equal time: the question is the rate, so the machine's load does not bias it.
The folder gets README.md (a table per width: mean final val loss per multiplier, the best one and the paired
one-sided t-test of the best against each neighbour, dev/stats.py) and runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from dev.runs import machine, train
from dev.stats import paired_lower
from models.config_loader import load_config
from utils.errors import ArgumentParser, UserError, number, run_cli, utf8_text
from utils.outputs import check_output

MAX_GRID = 7  # multipliers per width at most: 2^6 between the smallest and the largest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=utf8_text, required=True)
    p.add_argument("--out", type=utf8_text, required=True, help="the record's folder: new, or a stopped sweep's to go on with")
    p.add_argument("--widths", nargs="+", required=True, help="model widths, W or W:N (N seeds at W)")
    p.add_argument("--seeds", type=number(int, 0, 2**31 - 1, "seeds"), nargs="+", default=[1, 2, 3])
    p.add_argument("--alpha", type=number(float, 0, 0.5, "a significance level", above=True), default=0.01)
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides on top of --config for every run")
    args = p.parse_args(argv)
    if Path(args.out, "README.md").exists():
        raise UserError(f"{args.out} holds a finished sweep; a record is never overwritten: choose a new --out")
    check_output(args.out, [args.config], "--out")
    base = load_config(args.config, args.overrides)
    args.head_size = base.model.dim // base.model.n_heads
    args.ffn_ratio = base.model.ffn_dim / base.model.dim
    args.base = base
    widths = []
    for spec in args.widths:
        w, _, n = spec.partition(":")
        if not w.isdigit() or int(w) % args.head_size or (n and not (n.isdigit() and 1 <= int(n) <= len(args.seeds))):
            raise UserError(f"--widths: {spec!r} must be W or W:N with W a multiple of the head size "
                            f"{args.head_size} and N from 1 to the {len(args.seeds)} seeds")
        widths.append((int(w), args.seeds[:int(n)] if n else args.seeds))
    args.widths = widths
    return args


def width_overrides(args: argparse.Namespace, width: int, multiplier: float) -> list[str]:
    ffn = max(8, round(width * args.ffn_ratio / 8) * 8)
    o = args.base.optim
    return [*args.overrides, f"model.dim={width}", f"model.n_heads={width // args.head_size}",
            f"model.ffn_dim={ffn}", f"optim.lr={o.lr * multiplier:.6g}", f"optim.muon_lr={o.muon_lr * multiplier:.6g}",
            f"schedule.min_lr={args.base.schedule.min_lr * multiplier:.6g}"]


def final_loss(args: argparse.Namespace, width: int, multiplier: float, seed: int, log: Path) -> float:
    for line in log.read_text().splitlines() if log.exists() else []:  # a sweep that was stopped goes on
        run = json.loads(line)
        if (run["width"], run["multiplier"], run["seed"]) == (width, multiplier, seed):
            return run["val_loss"]
    overrides = [*width_overrides(args, width, multiplier), f"train.seed={seed}", "eval.every=0", "checkpoint.every=0"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        try:
            loss = [row["val/loss"] for row in train(args.config, overrides, Path(tmp)) if "val/loss" in row][-1]
        except UserError:  # a rate so high that the run's health checks stopped it: the worst loss there is
            loss = math.inf
    run = {"width": width, "multiplier": multiplier, "seed": seed, "val_loss": loss, "wall_s": time.time() - start,
           "overrides": overrides}
    print(json.dumps(run), file=sys.stderr)
    with open(log, "a") as f:
        f.write(json.dumps(run) + "\n")
    return loss


def follow_optimum(losses_at: Callable[[float], list[float]], centre: float) -> dict[float, list[float]]:
    """The losses per multiplier (losses_at(m): one per seed), the grid widened by 2x steps from
    (centre / 2, centre, 2 centre) until its best multiplier is an interior one, or MAX_GRID are tried."""
    losses: dict[float, list[float]] = {}
    todo = [centre / 2, centre, centre * 2]
    while todo:
        for m in todo:
            losses[m] = losses_at(m)
        grid = sorted(losses)
        best = min(grid, key=lambda m: mean(losses[m]))
        todo = [] if len(grid) >= MAX_GRID else [best / 2] if best == grid[0] else [best * 2] if best == grid[-1] else []
    return losses


def table(width: int, seeds: list[int], losses: dict[float, list[float]], alpha: float) -> list[str]:
    grid = sorted(losses)
    best = min(grid, key=lambda m: mean(losses[m]))
    lines = [f"### width {width}", "", "| multiplier | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | best against it |", "|---" * (len(seeds) + 3) + "|"]
    for m in grid:
        if m == best:
            against = "**best**"
        elif len(seeds) < 2:
            against = "1 seed: no test"
        else:
            diff, p = paired_lower(losses[best], losses[m])
            against = f"{diff:+.4f}, p = {p:.3g} ({'lower' if p < alpha else 'not shown'})"
        lines.append(f"| {m:g} | " + " | ".join(f"{x:.4f}" for x in losses[m]) + f" | {mean(losses[m]):.4f} | {against} |")
    return [*lines, ""]


def lr_sweep(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    centre, sections, summary = 1.0, [], []
    for width, seeds in args.widths:
        losses = follow_optimum(lambda m: [final_loss(args, width, m, seed, log) for seed in seeds], centre)
        centre = min(losses, key=lambda m: mean(losses[m]))
        edge = " (the grid's edge)" if centre in (min(losses), max(losses)) else ""
        sections += table(width, seeds, losses, args.alpha)
        o = args.base.optim
        summary.append(f"| {width} | {len(seeds)} | {centre:g}{edge} | {o.lr * centre:.3g} | "
                       + (f"{o.muon_lr * centre:.3g} |" if o.name == "muon" else "- |"))
    about = machine("cpu")
    command = "python -m dev.lr_sweep " + " ".join(sys.argv[1:])
    (out / "README.md").write_text("\n".join([
        f"# Learning rate against width: {args.config} (written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- machine: {about['cpu']}; torch {about['torch']}, Python {about['python']}",
        f"- every run: {' '.join(args.overrides) or 'the config as it is'}; width W = model.dim W, "
        f"W / {args.head_size} heads, ffn_dim {args.ffn_ratio:.4g} W; one multiplier on optim.lr, optim.muon_lr "
        f"and schedule.min_lr; final val loss: a deterministic pass over "
        + (f"the first {args.base.eval.max_bytes:,} bytes of " if args.base.eval.max_bytes else "")
        + "the validation split",
        f"- significance: the best multiplier against each other one, one-sided paired t-test over seeds, "
        f"p < {args.alpha}", "", "```bash", command, "```", "",
        "| width | seeds | best multiplier | optim.lr there | optim.muon_lr there |", "|---|---|---|---|---|",
        *summary, "", *sections]))
    print((out / "README.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: lr_sweep(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

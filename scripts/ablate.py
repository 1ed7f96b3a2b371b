"""Compare config variants at a fixed wall-clock training budget, several seeds each.

    python -m scripts.ablate --config configs/shakespeare_cpu.yaml --budget 25 --seeds 1 2 3 \\
        --variant base --variant "rope:model.pos_emb=rope" --variant "muon:optim.name=muon"

Each variant is first timed on a short run to find how many optimizer steps fit the budget (its
schedule is then planned for exactly that many), then trained once per seed; the final validation
loss is a full deterministic pass over the split. Prints a markdown table and writes JSON rows.

The significance rule: the first variant is the reference, and another variant "helps" only when its
final val loss is lower with p < --alpha (0.01) in a one-sided paired t-test over the seeds (seed k of
the variant against seed k of the reference: the same data order and, where shapes agree, the same
initial weights); "hurts" is the same test the other way round; anything else is "not shown".
Budgets count training steps only (the trainer's train/seconds), not startup or evaluation; figures are read
from each run's metrics.jsonl at full precision (a log line's 0.1 s rounding reads 0 on a fast machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

from models.config_loader import load_config
from utils.errors import ArgumentParser, UserError, one_line, run_cli
from utils.stats import paired_lower

ROOT = Path(__file__).resolve().parents[1]


def train(config: str, overrides: list[str]) -> dict[str, float]:
    """Run train_single.py in a scratch folder; the last value of every scalar its metrics.jsonl holds."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train_single.py", "--config", config, *overrides,
               f"checkpoint.dir={Path(tmp) / 'ckpt'}", f"logging.dir={Path(tmp) / 'logs'}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise UserError(f"training with {' '.join(overrides) or 'the config alone'} failed: {one_line(why[0])}")
        last: dict[str, float] = {}
        for line in next(Path(tmp, "logs").glob("*.metrics.jsonl")).read_text().splitlines():
            last.update(json.loads(line))
        return last


def seconds_per_step(config: str, overrides: list[str], steps: int) -> float:
    last = train(config, [*overrides, f"train.max_steps={steps}", "eval.every=0", "checkpoint.every=0",
                          "eval.sample_tokens=0", "eval.max_bytes=1000"])
    return last["train/seconds"] / last["step"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--budget", type=float, required=True, help="seconds of training per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--alpha", type=float, default=0.01, help="significance level of the rule (see above)")
    p.add_argument("--variant", action="append", required=True,
                   help="'name' or 'name:key=value key=value' (overrides on top of --config)")
    p.add_argument("--calibration-steps", type=int, default=60)
    p.add_argument("--json", default=None, help="append one JSON line per run here")
    args = p.parse_args(argv)
    if not args.budget > 0 or args.calibration_steps < 1 or not 0 < args.alpha < 1:
        raise UserError(f"--budget must be positive, --calibration-steps at least 1 and --alpha in (0, 1) (got "
                        f"{args.budget}, {args.calibration_steps} and {args.alpha})")
    args.variant = [(name, rest.split()) for name, _, rest in (v.partition(":") for v in args.variant)]
    for name, overrides in args.variant:  # every variant's config is checked before hours of runs start
        try:
            load_config(args.config, overrides)
        except UserError as e:
            raise UserError(f"variant {name!r}: {e}") from None
    return args


def ablate(args: argparse.Namespace) -> int:
    rows = []
    for name, overrides in args.variant:
        sps = seconds_per_step(args.config, overrides, args.calibration_steps)
        steps = max(1, int(args.budget / sps))
        losses, times = [], []
        for seed in args.seeds:
            last = train(args.config, [*overrides, f"train.seed={seed}", f"train.max_steps={steps}",
                                       f"eval.every={steps}", "checkpoint.every=0"])
            losses.append(last["val/loss"])
            times.append(last["train/seconds"])
            run = {"variant": name, "overrides": overrides, "seed": seed, "steps": steps, "val_loss": last["val/loss"],
                   "train_seconds": last["train/seconds"], "budget": args.budget, "config": args.config}
            print(json.dumps(run), file=sys.stderr)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(run) + "\n")
        rows.append((name, " ".join(overrides) or "-", steps, mean(times), losses))
    print("| variant | overrides | steps | train s | " + " | ".join(f"val (seed {s})" for s in args.seeds)
          + " | mean val | vs first |")
    print("|---" * (6 + len(args.seeds)) + "|")
    reference = rows[0][4]
    for name, ov, steps, secs, losses in rows:
        against = verdict(losses, reference, args.alpha) if losses is not reference else "reference"
        print(f"| {name} | `{ov}` | {steps} | {secs:.1f} | " + " | ".join(f"{l:.4f}" for l in losses)
              + f" | **{mean(losses):.4f}** | {against} |")
    return 0


def verdict(losses: list[float], reference: list[float], alpha: float) -> str:
    """The significance rule's verdict on one variant against the reference, with its figures."""
    if len(losses) < 2:
        return "1 seed: no test"
    diff, p_lower = paired_lower(losses, reference)
    word = "helps" if p_lower < alpha else "hurts" if 1 - p_lower < alpha else "not shown"
    return f"{diff:+.4f}, p = {min(p_lower, 1 - p_lower):.3g} ({word})"


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: ablate(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

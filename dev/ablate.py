"""Compare config variants at a fixed wall-clock training budget, several seeds each.

    python -m dev.ablate --config configs/shakespeare_cpu.yaml --budget 25 --seeds 1 2 3 \\
        --variant base --variant "rope:model.pos_emb=rope" --variant "muon:optim.name=muon"

Each variant is first timed on a short run to find how many optimizer steps fit the budget (its
schedule is then planned for exactly that many; a variant that sets train.max_steps keeps it), then
trained once per seed, the variants taking turns; the final validation loss is a full deterministic
pass over the split. Prints a markdown table and writes JSON rows. On a machine whose speed drifts
(docs/recipes.md), read the table's train s: a variant that got more time than the others is not
compared at equal time.

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
import sys
import tempfile
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from dev.runs import train
from dev.stats import paired_lower
from models.config_loader import load_config
from utils.errors import ArgumentParser, UserError, number, run_cli, utf8_text
from utils.outputs import check_output


def seconds_per_step(config: str, overrides: list[str], steps: int) -> float:
    """Timed over the second half of a short run: its first steps (allocation, warm-up) are slower."""
    half = max(1, steps // 2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = train(config, [*overrides, f"train.max_steps={2 * half}", f"train.log_every={half}", "eval.every=0",
                              "checkpoint.every=0", "eval.sample_tokens=0", "eval.max_bytes=1000"], Path(tmp))
    seconds = {row["step"]: row["train/seconds"] for row in rows if "train/seconds" in row}
    return (seconds[2 * half] - seconds[half]) / half


def planned_steps(args: argparse.Namespace, overrides: list[str]) -> int:
    if any(o.startswith("train.max_steps=") for o in overrides):
        return load_config(args.config, overrides).train.max_steps
    return max(1, int(args.budget / seconds_per_step(args.config, overrides, args.calibration_steps)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=utf8_text, required=True)
    p.add_argument("--budget", type=number(float, 0, 1e7, "seconds", above=True), required=True,
                   help="seconds of training per run")
    p.add_argument("--seeds", type=number(int, 0, 2**32 - 1, "seeds"), nargs="+", default=[1, 2, 3])
    p.add_argument("--alpha", type=number(float, 0, 0.5, "a significance level", above=True), default=0.01,
                   help="significance level of the rule (see above)")
    p.add_argument("--variant", action="append", required=True,
                   help="'name' or 'name:key=value key=value' (overrides on top of --config)")
    p.add_argument("--calibration-steps", type=number(int, 1, 10**6, "optimizer steps"), default=150,
                   help="steps of the timing run, timed over its second half (default 150: a CPU's first "
                        "seconds at boost clock would plan too many steps)")
    p.add_argument("--json", type=utf8_text, default=None, help="append one JSON line per run here")
    args = p.parse_args(argv)
    if args.json:
        check_output(args.json, [args.config], "--json")
    args.variant = [(name, rest.split()) for name, _, rest in (v.partition(":") for v in args.variant)]
    for name, overrides in args.variant:  # every variant's config is checked before hours of runs start
        try:
            load_config(args.config, overrides)
        except UserError as e:
            raise UserError(f"variant {name!r}: {e}") from None
    return args


def ablate(args: argparse.Namespace) -> int:
    # the variants take turns, seed by seed: this machine's speed drifts by 20-30% over tens of seconds
    # (docs/recipes.md), and turns spread a slow spell over all variants alike
    steps = {name: planned_steps(args, overrides) for name, overrides in args.variant}
    losses: dict[str, list[float]] = {name: [] for name, _ in args.variant}
    times: dict[str, list[float]] = {name: [] for name, _ in args.variant}
    for seed in args.seeds:
        for name, overrides in args.variant:
            with tempfile.TemporaryDirectory() as tmp:
                rows = train(args.config, [*overrides, f"train.seed={seed}", f"train.max_steps={steps[name]}",
                                           f"eval.every={steps[name]}", "checkpoint.every=0"], Path(tmp))
            last = {k: v for row in rows for k, v in row.items()}
            losses[name].append(last["val/loss"])
            times[name].append(last["train/seconds"])
            run = {"variant": name, "overrides": overrides, "seed": seed, "steps": steps[name],
                   "val_loss": last["val/loss"], "train_seconds": last["train/seconds"], "budget": args.budget,
                   "config": args.config}
            print(json.dumps(run), file=sys.stderr)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(run) + "\n")
    rows = [(name, " ".join(overrides) or "-", steps[name], mean(times[name]), losses[name])
            for name, overrides in args.variant]
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

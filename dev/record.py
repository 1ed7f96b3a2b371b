"""Make a record: a track's configs trained with several seeds, optionally side by side with nanoGPT,
written to one folder that holds everything needed to check the claim and to reproduce it.

    python -m dev.record --out records/cpu/2026-12-04 --nanogpt /tmp/nanoGPT --seeds 1 2 3 \\
        --run "quarter=configs/shakespeare_cpu.yaml eval.every=37" \\
        --run "full=configs/shakespeare_cpu.yaml train.max_steps=730 eval.every=73" --target full:1.60
    python -m dev.record --out records/gpu1/DATE --run enwik8=configs/enwik8_1gpu.yaml --seeds 1 2 3 --test

Seed by seed, nanoGPT's CPU Tiny Shakespeare recipe (its unmodified train.py, as docs/recipes.md runs it)
and then every --run take turns, so a slow spell of the machine falls on all of them. Each run trains with
train.seed=SEED into OUT/NAME-sSEED (its log, metrics.jsonl and TensorBoard files; checkpoints go to a
scratch folder and are deleted). The folder gets README.md (machine, command, a table per run and seed,
the verdicts), runs.jsonl (one line per run), NAME.yaml (each config as it ran), nanogpt-sSEED.log and
curves.png/.svg (scripts/plot_runs.py: the first seed of every run, and nanoGPT).

The significance rule (modded-nanogpt's): a run "reaches" a loss when its final validation loss is below it
with p < --alpha (0.01) in a one-sided t-test over the seeds (dev/stats.py). With --nanogpt every run is
tested against nanoGPT's final val loss and its time is the median over seeds of (its seconds of training /
nanoGPT's in the same turn); --target NAME:LOSS adds a loss of one's own. --test evaluates each run's final
weights on the test split (scripts/evaluate.py) for bits per byte, as enwik8 results are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from dev.runs import machine, read_metrics, run
from dev.stats import paired_lower
from models.config_loader import config_to_yaml, load_config
from utils.errors import ArgumentParser, UserError, child_error, number, run_cli, utf8_text
from utils.outputs import check_output
from utils.metrics.curves import plot, read_nanogpt_log, read_runs

ROOT = Path(__file__).resolve().parents[1]
# nanoGPT's CPU recipe for Tiny Shakespeare (its README's, with no dropout and a 20-batch evaluation)
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
               "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=utf8_text, required=True, help="the record's folder (must not exist yet)")
    p.add_argument("--run", action="append", required=True, metavar="NAME=CONFIG",
                   help="a config to train, named; overrides after it: NAME=CONFIG key=value ...")
    p.add_argument("--seeds", type=number(int, 0, 2**32 - 1, "seeds"), nargs="+", default=[1, 2, 3])
    p.add_argument("--nanogpt", type=utf8_text, default=None, help="a nanoGPT checkout with data/shakespeare_char prepared")
    p.add_argument("--target", action="append", default=[], metavar="NAME:LOSS", help="a val loss NAME must beat")
    p.add_argument("--test", action="store_true", help="also report each run's test-split bits per byte")
    p.add_argument("--alpha", type=number(float, 0, 0.5, "a significance level", above=True), default=0.01)
    p.add_argument("--device", default="auto")
    p.add_argument("--nproc", type=number(int, 1, 1024, "processes"), default=1,
                   help="processes per run: more than 1 runs torchrun train_ddp.py")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds must differ, got {args.seeds}")
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} exists; a record is never overwritten: choose a new --out")
    args.runs = {}
    for spec in args.run:
        name, eq, rest = spec.partition("=")
        words = rest.split()
        if not eq or not name.isidentifier() or name == "nanoGPT" or not words:
            raise UserError(f"--run must look like NAME=CONFIG [key=value ...] with NAME a word, got {spec!r}")
        if name in args.runs:
            raise UserError(f"--run {name} is given twice")
        try:
            cfg = load_config(words[0], words[1:])
        except UserError as e:
            raise UserError(f"--run {name}: {e}") from None
        args.runs[name] = (words[0], words[1:], cfg)
    args.targets = {}
    for spec in args.target:
        name, _, loss = spec.partition(":")
        try:
            args.targets[name] = float(loss)
        except ValueError:
            raise UserError(f"--target must look like NAME:LOSS, got {spec!r}") from None
        if name not in args.runs or not math.isfinite(args.targets[name]):
            raise UserError(f"--target {spec}: NAME must be one of the --run names and LOSS a number")
    check_output(out, [*(config for config, _, _ in args.runs.values()), args.nanogpt])
    if args.nanogpt is not None:
        ready = Path(args.nanogpt, "data", "shakespeare_char", "train.bin")
        if not Path(args.nanogpt, "train.py").is_file() or not ready.is_file():
            raise UserError(f"{args.nanogpt} is not a nanoGPT checkout with Tiny Shakespeare prepared ({ready} is "
                            f"missing): copy the text to data/shakespeare_char/input.txt there and run "
                            f"python data/shakespeare_char/prepare.py")
    return args


def run_nanogpt(checkout: Path, log: Path) -> dict:
    """nanoGPT's CPU recipe, its stdout saved as log; its final val loss and seconds of training."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(log, "w") as f:
            proc = run([sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={tmp}"], cwd=checkout, stdout=f,
                       stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise UserError(f"nanoGPT's train.py exited {proc.returncode}; its output is in {log}")
    step, seconds, loss = read_nanogpt_log(log, "nanoGPT").val[-1]
    return {"steps": step, "train_seconds": seconds, "val_loss": loss}


def run_ours(name: str, config: str, overrides: list[str], seed: int, folder: Path, args: argparse.Namespace) -> dict:
    """One training run; its last figures and its validation curve, from its metrics.jsonl."""
    device, test = args.device, args.test
    launch = [sys.executable, "train_single.py"] if args.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "train_ddp.py"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*launch, "--config", Path(config).resolve(), "--device", device, *overrides,
               f"train.seed={seed}", f"logging.dir={folder.resolve()}", f"checkpoint.dir={tmp}"]
        proc = run(cmd, cwd=ROOT, capture_output=True)
        if proc.returncode != 0:
            raise UserError(f"run {name}, seed {seed} failed: {child_error(proc)}")
        last = {k: v for row in read_metrics(folder) for k, v in row.items()}
        # (step, seconds of training, loss) per evaluation, the seconds interpolated between logged steps
        curve = read_runs(str(folder))[0].val
        result = {"steps": last["step"], "train_seconds": last["train/seconds"], "val_loss": last["val/loss"],
                  "val_curve": curve}
        if test:
            out = Path(tmp, "test.json")
            final = max(Path(tmp).glob("step_*.pt"))  # the last weights, as the table's val loss is theirs
            proc = run([sys.executable, "-m", "scripts.evaluate", "--checkpoint", final, "--split", "test",
                        "--device", device, "--json", out], cwd=ROOT, capture_output=True)
            if proc.returncode != 0:
                raise UserError(f"run {name}, seed {seed}: the test split could not be evaluated: {child_error(proc)}")
            result["test_bits_per_byte"] = json.loads(out.read_text())["bits_per_byte"]
    return result


def reaches(losses: list[float], target: float, alpha: float) -> str:
    """The significance rule's verdict that these final losses are below target."""
    if len(losses) < 2:
        return f"mean {statistics.fmean(losses):.4f} vs {target:.4f}: 1 seed, no test"
    diff, p = paired_lower(losses, [target] * len(losses))
    return f"mean {statistics.fmean(losses):.4f} vs {target:.4f}: {diff:+.4f}, p = {p:.2g} " \
           f"({'reached' if p < alpha else 'not shown'})"


def write_readme(args: argparse.Namespace, out: Path, rows: list[dict], about: dict, command: str) -> str:
    """README.md of the record; returns its summary lines (also printed)."""
    ref = [r for r in rows if r["run"] == "nanoGPT"]
    lines = [f"# Record: {', '.join(args.runs)} ({about['date']})", "",
             f"- machine: {about['device']}" + (f" on {about['cpu']}" if about["cpu"] != about["device"] else "")
             + (f"; {about['gpus']} GPU(s) visible" if about["gpus"] else "") + f"; torch {about['torch']}, Python {about['python']}",
             f"- load: 1-minute load average {about['load_start']:.2f} at the start, "
             f"{about['load_end']:.2f} at the end (each run's own in runs.jsonl)",
             f"- seeds: {' '.join(map(str, args.seeds))}; significance: one-sided t-test over seeds, p < {args.alpha}",
             "- seconds of training: the trainer's train/seconds (optimizer steps only, no start-up or evaluation); "
             "nanoGPT's: its iteration times summed without the iterations that evaluated",
             "", "Reproduce (from the repository root):", "", "```bash", command, "```", "",
             "| run | config | seed | steps | s of training | final val loss | test bits/byte |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        test = f"{r['test_bits_per_byte']:.4f}" if "test_bits_per_byte" in r else ""
        lines.append(f"| {r['run']} | {r['config']} | {r['seed']} | {r['steps']} | {r['train_seconds']:.1f} | "
                     f"{r['val_loss']:.4f} | {test} |")
    summary = []
    for name in args.runs:
        mine = [r for r in rows if r["run"] == name]
        losses = [r["val_loss"] for r in mine]
        if ref:
            ratios = [m["train_seconds"] / n["train_seconds"] for m, n in zip(mine, ref)]
            theirs = statistics.median(r["val_loss"] for r in ref)  # the same every turn: nanoGPT fixes its seed
            summary.append(f"- **{name}** against nanoGPT's final val loss: {reaches(losses, theirs, args.alpha)}"
                           f"; time {statistics.median(ratios):.3f}x nanoGPT's (median over seeds; "
                           f"{', '.join(f'{x:.3f}' for x in ratios)})")
            first = [next((t / n["train_seconds"] for _, t, loss in m["val_curve"] if loss <= theirs), None)
                     for m, n in zip(mine, ref)]
            if None not in first:
                summary.append(f"- **{name}** first evaluated at or below it after {statistics.median(first):.3f}x "
                               f"nanoGPT's time (median over seeds; {', '.join(f'{x:.3f}' for x in first)})")
        if name in args.targets:
            summary.append(f"- **{name}** against {args.targets[name]}: {reaches(losses, args.targets[name], args.alpha)}")
        if args.test:
            summary.append(f"- **{name}** test bits per byte: "
                           f"{statistics.fmean(r['test_bits_per_byte'] for r in mine):.4f} (mean over seeds)")
    lines += ["", "## Verdicts", "", *summary, "", "![validation and train loss against steps and seconds](curves.png)", ""]
    (out / "README.md").write_text("\n".join(lines))
    return "\n".join(summary)


def record(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True)
    command = shlex.join(["python", "-m", "dev.record", *sys.argv[1:]])
    for name, (_, _, cfg) in args.runs.items():
        (out / f"{name}.yaml").write_text(config_to_yaml(cfg))
    about = {**machine(args.device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "load_start": os.getloadavg()[0]}
    rows = []
    for seed in args.seeds:
        turn = []
        if args.nanogpt is not None:
            turn.append(("nanoGPT", "nanoGPT's train.py, CPU recipe",
                         lambda: run_nanogpt(Path(args.nanogpt), out / f"nanogpt-s{seed}.log")))
        for name, (config, overrides, _) in args.runs.items():
            turn.append((name, " ".join([config, *overrides]), lambda n=name, c=config, o=overrides: run_ours(
                n, c, o, seed, out / f"{n}-s{seed}", args)))
        for name, config, go in turn:
            load = os.getloadavg()[0]
            row = {"run": name, "config": config, "seed": seed, **go(), "load_start": load,
                   "load_end": os.getloadavg()[0]}
            rows.append(row)
            print(f"{name} seed {seed}: {row['steps']} steps, {row['train_seconds']:.1f} s of training, "
                  f"val {row['val_loss']:.4f}", flush=True)
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    about["load_end"] = os.getloadavg()[0]
    first = args.seeds[0]
    curves = [c for name in args.runs for c in read_runs(f"{name}={out / f'{name}-s{first}'}")]
    if args.nanogpt is not None:
        curves.append(read_nanogpt_log(out / f"nanogpt-s{first}.log", "nanoGPT"))
    # the first evaluation's loss (about 5.5 untrained) would flatten the rest: the axis starts at the second
    ymax = max((c.val[1][2] for c in curves if len(c.val) > 1), default=None)
    plot(curves, "both", out / "curves.png", f"seed {first}; {about['device']}", ymax and ymax * 1.05, 10, 3.6, 80)
    print(write_readme(args, out, rows, about, command))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: record(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""Time the real training step and report throughput, MFU and peak memory.

The model, optimizer and step are built by utils/train/trainer.py's build_trainer, exactly as training
builds them, and each timed step is Trainer.train_step: forward, backward, clipping, the
non-finite guard and the optimizer update, with its one host sync.

    python -m scripts.benchmark --config configs/default_config.yaml train.batch_size=8
    python -m scripts.benchmark --config configs/default_config.yaml train.batch_size=8 --compare --rounds 3
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m scripts.benchmark \\
        --config configs/default_config.yaml --device cpu train.batch_size=4 --baseline-tokens-per-sec 7740

--compare runs fp32/bf16 x eager/compiled, each in a fresh process (so peak RSS, thread pools and
compile caches are its own), and prints the ratios; --rounds N alternates the cases N times and
keeps each case's median round, which steadies the ratios on a machine shared with other work.
Under torchrun the figures are per process and in total, with the scaling efficiency against
--baseline-tokens-per-sec (a one-process run's tokens_per_sec). Output: a table, then one JSON
line. docs/benchmarks.md explains every field and holds the measured results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from models.config import Config
from models.config_checks import ConfigError
from models.config_loader import load_config
from utils.device import DEVICE_CHOICES, device_name, synchronize
from utils.distributed.process_group import DistInfo, gather_object, process_group
from utils.errors import ArgumentParser, number, require_stdout, run_cli, utf8_text
from utils.metrics.flops import model_flops_utilization, peak_flops
from utils.metrics.logger import MetricsLogger
from utils.distributed.parallel import compiled_as, parallelize
from utils.precision import Precision
from utils.progress import progress
from utils.train.run import agree_precision, build_trainer, load_data, resolved

FLOPS_BASIS = "6N + 12*L*d*T per token (PaLM appendix B / nanoGPT; N without position embeddings)"
COMPARE = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: max allocated by tensors; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def local_state_mib(trainer) -> float:
    """Bytes this process holds in parameters, gradients and optimizer state (its shards under FSDP)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = {id(p): local(p) for p in trainer.raw.parameters()}  # a tied weight counts once
    states = [local(v) for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    # each gradient is the size of its parameter (zero_grad frees them between steps, so count from those)
    return (2 * sum(p.numel() * p.element_size() for p in params.values())
            + sum(v.numel() * v.element_size() for v in states)) / 2 ** 20


def measure(cfg: Config, precision: Precision, info: DistInfo, steps: int, warmup: int) -> dict:
    """Warm up, then time `steps` optimizer steps of Trainer.train_step on this process."""
    t = cfg.train
    wrap = (lambda m, p: parallelize(m, info, cfg.distributed, p)) if info.world_size > 1 else None
    with tempfile.TemporaryDirectory() as log_dir:
        logger = MetricsLogger(log_dir, info.is_main)
        try:
            plan, val_data = load_data(cfg, info)
            trainer = build_trainer(cfg, precision, info, plan, val_data, logger, wrap)
            bar = progress(warmup + steps, "benchmark", unit="step", enabled=info.is_main)
            for _ in range(warmup):
                trainer.train_step()
                bar.update()
            if info.device.type == "cuda":  # the peak of the timed steps, not of compiling (a CPU's RSS peak stays)
                torch.cuda.reset_peak_memory_stats(info.device)
            times = []
            for _ in range(steps):
                synchronize(info.device)
                t0 = time.perf_counter()
                trainer.train_step()
                synchronize(info.device)
                times.append(time.perf_counter() - t0)
                bar.update()  # outside the timed span
            bar.close()
            state_mib = local_state_mib(trainer)
        finally:
            logger.close()
    compiled = compiled_as(trainer.model)
    compile_label = ("on" if compiled == "whole" else f"on, {compiled}") if compiled else \
        ("failed, eager" if t.compile else "off")
    peak, peak_source = peak_flops(info.device, precision.name)
    step_s = statistics.median(times)
    tokens_per_sec = trainer.meter.tokens_per_step / info.world_size / step_s
    mfu = model_flops_utilization(tokens_per_sec, trainer.meter.flops_per_token, peak)
    return {
        "device": device_name(info.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "precision": precision.name, "compile": compile_label,
        "fused_adamw": bool(trainer.optimizer.defaults.get("fused")),
        "activation_checkpointing": t.activation_checkpointing,
        "params": trainer.raw.num_params(), "batch_size": t.batch_size, "context_length": cfg.model.context_length,
        "tokens_per_step": trainer.meter.tokens_per_step // info.world_size, "steps": steps, "warmup": warmup,
        "ms_per_step": round(step_s * 1e3, 2), "ms_per_step_mean": round(statistics.fmean(times) * 1e3, 2),
        "tokens_per_sec": round(tokens_per_sec, 1), "flops_per_token": trainer.meter.flops_per_token,
        "flops_basis": FLOPS_BASIS, "achieved_tflops": round(tokens_per_sec * trainer.meter.flops_per_token / 1e12, 4),
        "peak_flops": peak, "peak_source": peak_source,
        "mfu": mfu, "peak_memory_mib": round(peak_memory_mib(info.device), 1), "strategy": cfg.distributed.strategy,
        "state_mib": round(state_mib, 1),
        "loadavg_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
    }


def fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def print_row_table(rows: list[dict], columns: list[str]) -> None:
    cells = [columns] + [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for i, row in enumerate(cells):
        print(" | ".join(v.rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def print_result(result: dict) -> None:
    shown = {**result, "mfu": "n/a" if result["mfu"] is None else f"{result['mfu']:.2%}"}
    if result.get("peak_flops"):
        shown["peak_flops"] = f"{result['peak_flops'] / 1e12:.2f} TFLOP/s"
    width = max(map(len, shown))
    for key, value in shown.items():
        print(f"{key.ljust(width)}  {fmt(value)}")


def single(cfg: Config, args: argparse.Namespace) -> int:
    with process_group(cfg.distributed, args.device) as info:
        precision = agree_precision(cfg, info, None)
        cfg = resolved(cfg, precision, steps_per_epoch=0)  # a benchmark plans by train.max_steps
        if info.is_main:
            print(f"precision {precision.name}: {precision.reason}", flush=True)
        result = measure(cfg, precision, info, args.steps, args.warmup)
        results = gather_object(result, info)
    if not info.is_main:
        return 0
    if info.world_size > 1:
        per_process = statistics.fmean(r["tokens_per_sec"] for r in results)
        baseline = args.baseline_tokens_per_sec
        mfus = [r["mfu"] for r in results]
        result = {**result, "world_size": info.world_size, "tokens_per_sec": round(per_process, 1),
                  "total_tokens_per_sec": round(per_process * info.world_size, 1),
                  "ms_per_step": round(statistics.fmean(r["ms_per_step"] for r in results), 2),
                  "mfu": None if None in mfus else statistics.fmean(mfus),
                  "peak_memory_mib": max(r["peak_memory_mib"] for r in results),
                  "peak_memory_mib_per_rank": [r["peak_memory_mib"] for r in results],
                  "state_mib_per_rank": [r["state_mib"] for r in results],
                  "baseline_tokens_per_sec": baseline,
                  # GPUs: each process adds a device, so 1.0 is perfect; CPU processes share the cores
                  "scaling_efficiency": round(per_process / baseline, 4) if baseline else None,
                  "total_vs_baseline": round(per_process * info.world_size / baseline, 4) if baseline else None}
    print_result(result)
    print(json.dumps(result))
    return 0


def compare(args: argparse.Namespace, overrides: list[str]) -> int:
    """Each (precision, compile) case in a fresh process, the cases alternating for --rounds rounds so
    a change in background load hits all of them; per case the round with the median time is kept."""
    runs: dict[tuple[str, bool], list[dict]] = {case: [] for case in COMPARE}
    for round_ in range(args.rounds):
        for precision, compiled in COMPARE:
            cmd = [sys.executable, "-m", "scripts.benchmark", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), *(["--config", args.config] if args.config else []),
                   *(["--device", args.device] if args.device else []),
                   *overrides, f"train.precision={precision}", f"train.compile={str(compiled).lower()}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[(precision, compiled)].append(row)
            print(f"round {round_ + 1}/{args.rounds}: {precision}, compile {row['compile']}: "
                  f"{row['ms_per_step']} ms/step", flush=True)
    rows = [sorted(case_runs, key=lambda r: r["ms_per_step"])[(len(case_runs) - 1) // 2] for case_runs in runs.values()]
    for row in rows:
        row["speedup"] = round(row["tokens_per_sec"] / rows[0]["tokens_per_sec"], 3)
        row["mfu_pct"] = None if row["mfu"] is None else round(100 * row["mfu"], 2)
    print(f"{rows[0]['device']} | torch {rows[0]['torch']} | {rows[0]['threads']} threads | "
          f"{rows[0]['params']:,} parameters | {rows[0]['tokens_per_step']:,} tokens per step | "
          f"median of {args.steps} steps after {args.warmup} warm-up, median of {args.rounds} rounds | "
          f"MFU: {FLOPS_BASIS}")
    print_row_table(rows, ["precision", "compile", "ms_per_step", "tokens_per_sec", "achieved_tflops", "mfu_pct",
                           "peak_memory_mib", "speedup"])
    print(json.dumps({"reference": "fp32, eager", "rounds": args.rounds, "cases": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Benchmark the training step.",
                                     epilog="Overrides: section.key=value ... (e.g. train.batch_size=8)")
    parser.add_argument("--config", type=utf8_text, default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--device", default=None, help=f"{DEVICE_CHOICES} (default auto: CUDA, then MPS, then CPU)")
    parser.add_argument("--steps", type=number(int, 1, 10**6, "optimizer steps"), default=20,
                        help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=number(int, 0, 10**6, "optimizer steps"), default=3,
                        help="untimed optimizer steps first (default 3)")
    parser.add_argument("--compare", action="store_true", help="fp32/bf16 x eager/compiled side by side")
    parser.add_argument("--rounds", type=number(int, 1, 10**4, "rounds"), default=None,
                        help="--compare: alternate the cases this many times (default 1)")
    parser.add_argument("--baseline-tokens-per-sec", type=number(float, 0, 1e15, "tokens/s", above=True),
                        default=None,
                        help="one process's tokens/s, for the scaling efficiency under torchrun")

    def body() -> int:
        args, overrides = parser.parse_known_args(argv)
        require_stdout("the figures")
        for item in overrides:
            if item.startswith("-"):
                parser.error(f"unrecognized argument: {item}")
        if args.compare and args.baseline_tokens_per_sec is not None:
            raise ConfigError("--baseline-tokens-per-sec rates a run under torchrun, which --compare is not; give one")
        if args.rounds is not None and not args.compare:
            raise ConfigError("--rounds alternates the cases of --compare; add --compare, or drop --rounds")
        cfg = load_config(args.config, overrides)
        if args.compare:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("--compare starts its own processes; run it without torchrun")
            args.rounds = args.rounds or 1
            return compare(args, overrides)
        return single(cfg, args)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

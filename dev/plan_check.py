"""Check the planner against a measured peak: predicted vs measured memory per rank for one config.

    python -m dev.plan_check --config configs/default_config.yaml --world-size 2 \\
        distributed.strategy=fsdp train.batch_size=8 data.dir=data/default

Runs scripts/benchmark.py (the real Trainer.train_step, under torchrun when --world-size > 1) twice,
each in a fresh process: on the config, and on a baseline of the same command with a tiny model
(dim 32, 1 layer, context 16, micro-batch 1). The baseline's peak is what the process costs with
next to no model: Python, torch, the process group, thread stacks, the data. Measured = the config's
peak per rank - the baseline's; predicted = the planner's peak_bytes for the config - its prediction
for the baseline (a few KiB). The peak is the largest over ranks: on a CPU the peak resident set
size (getrusage), on CUDA torch.cuda.max_memory_allocated. Prints a markdown row, then one JSON line.

On a CPU the runs get MALLOC_MMAP_THRESHOLD_=131072 unless --glibc-default (FSDP on several ranks sets
that threshold itself either way, utils/malloc.py): glibc otherwise raises its mmap threshold after the
first large free (up to 32 MiB) and keeps later freed tensors in its heaps, so the resident size counts
memory torch has already freed. That retention is the CPU's counterpart of CUDA's cached-but-unallocated
memory, which max_memory_allocated leaves out too; under FSDP it measured up to twice the live tensor
bytes (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from dev.runs import run
from models.config_loader import load_config
from utils.device import DEVICE_CHOICES, resolve_device
from utils.errors import ArgumentParser, UserError, number, run_cli, utf8_text
from utils.precision import resolve_precision
from utils.train.memory_plan import plan_memory

BASELINE = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=64", "model.context_length=16",
            "train.batch_size=1", "train.grad_accum_steps=1"]


RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # every tensor over 128 KiB is its own mapping, unmapped when freed


def measured_peak_mib(config: str | None, overrides: list[str], world_size: int, device: str, steps: int,
                      env: dict[str, str]) -> float:
    """The benchmark's peak memory per rank (the largest over ranks), in MiB, from a fresh process."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"] \
        if world_size > 1 else [sys.executable]
    cmd = [*launch, "-m", "scripts.benchmark", "--device", device, "--steps", "1", "--warmup", str(steps - 1),
           *(["--config", config] if config else []), *overrides]
    proc = run(cmd, capture_output=True, env={**os.environ, **env})
    if proc.returncode != 0:
        raise UserError(f"the measured run failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_memory_mib"]


def predicted_mib(config: str | None, overrides: list[str], world_size: int, device: torch.device) -> float:
    cfg = load_config(config, overrides)
    precision = resolve_precision(cfg.train.precision, device, cfg.model, cfg.train.batch_size).name
    return plan_memory(cfg, world_size, device, precision).peak_bytes(cfg.train.batch_size) / 2 ** 20


def check(config: str | None, overrides: list[str], world_size: int, device: torch.device, steps: int,
          env: dict[str, str]) -> dict:
    cfg = load_config(config, overrides)  # bad input fails here, before anything runs
    baseline = overrides + BASELINE
    measured = measured_peak_mib(config, overrides, world_size, str(device), steps, env)
    measured_base = measured_peak_mib(config, baseline, world_size, str(device), steps, env)
    predicted = predicted_mib(config, overrides, world_size, device) - predicted_mib(config, baseline, world_size,
                                                                                      device)
    return {"strategy": cfg.distributed.strategy, "world_size": world_size, "precision": cfg.train.precision,
            "activation_checkpointing": cfg.train.activation_checkpointing, "batch_size": cfg.train.batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps, "overrides": overrides,
            "peak_mib": measured, "baseline_peak_mib": measured_base, "measured_mib": round(measured - measured_base, 1),
            "predicted_mib": round(predicted, 1), "ratio": round(predicted / (measured - measured_base), 3),
            "memory": "max_memory_allocated" if device.type == "cuda" else "peak RSS", "env": env}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Predicted vs measured peak memory per rank for one config.",
                            epilog="Overrides: section.key=value ... (e.g. train.batch_size=8)")
    parser.add_argument("--config", type=utf8_text, default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--world-size", type=number(int, 1, 1024, "ranks"), default=1, help="ranks; above 1 the runs go through torchrun")
    parser.add_argument("--device", default="cpu", help=f"{DEVICE_CHOICES} (default cpu)")
    # the optimizer state exists from step 2
    parser.add_argument("--steps", type=number(int, 2, 10**6, "optimizer steps"), default=3,
                        help="optimizer steps per measured run (default 3)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="CPU: leave glibc's mmap threshold as it is (resident size then includes freed memory), "
                             "except under FSDP on several ranks, which fixes it itself")

    def body() -> int:
        args, overrides = parser.parse_known_args(argv)  # inside: a usage error is one line too
        for item in overrides:
            if item.startswith("-"):
                parser.error(f"unrecognized argument: {item}")
        device = resolve_device(args.device)
        env = RETURN_FREED if device.type == "cpu" and not args.glibc_default else {}
        r = check(args.config, overrides, args.world_size, device, args.steps, env)
        ac = "on" if r["activation_checkpointing"] else "off"
        print(f"| {r['strategy']} | {r['world_size']} | {r['precision']} | {ac} | {r['batch_size']} | "
              f"{r['peak_mib']:,.0f} - {r['baseline_peak_mib']:,.0f} = {r['measured_mib']:,.0f} | "
              f"{r['predicted_mib']:,.0f} | {r['ratio']:.2f} |")
        print(json.dumps(r))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

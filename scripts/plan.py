"""Plan a run before it starts: memory per rank, the micro-batch that fits, FLOPs and time per step.

    python -m scripts.plan --config configs/gpt2_small.yaml --world-size 8 --device-memory 80GiB
    python -m scripts.plan --config configs/default_config.yaml distributed.strategy=fsdp --world-size 4 --json
    python -m scripts.plan --config configs/gpt2_small.yaml --device-memory 80GiB --peak-tflops 989  # an H100, from here

Nothing is allocated: parameters come from the model built on the meta device, activations from its
forward run on fake tensors (utils/train/memory_plan.py says what the peak is made of). The time is the
model FLOPs of a step (utils/metrics/flops.py) over the device's peak FLOP/s times an assumed MFU (--mfu).
`--json` prints one object; `peak_bytes` is the predicted peak per rank. The check against measured
peaks is dev/plan_check.py (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from models.config import Config
from models.config_checks import ConfigError
from models.config_loader import load_config
from utils.device import DEVICE_CHOICES, device_name, resolve_device
from utils.errors import ArgumentParser, number, require_stdout, run_cli, utf8_text
from utils.metrics.flops import flops_per_token, peak_flops
from utils.metrics.logger import format_seconds
from utils.precision import resolve_precision
from utils.train.memory_plan import meta_model, plan_memory

DEFAULT_MFU = 0.4
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80G' (binary), '80GB' (decimal), '81920MiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    size = float(match.group(1)) * UNITS.get(match.group(2).lower(), 0) if match else 0
    if not 1 << 20 <= size <= 1 << 60:  # a whole mebibyte up to an exbibyte; 1e400 is inf, and refused too
        raise ConfigError(f"--device-memory {text!r:.40} is not a size from 1MiB to 1EiB; write it like 80GiB, 24G, "
                          f"512MiB or 16000000000 (bytes)")
    return int(size)


def device_memory(device: torch.device) -> int:
    """The whole memory of the device: a GPU's, or the machine's RAM for a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def keep_global_batch(per_rank: int, largest: int) -> tuple[int, int]:
    """(micro-batch, accumulation) with micro-batch * accumulation == per_rank, the micro-batch as
    large as fits: the largest divisor of per_rank not above `largest`."""
    batch = max((b for b in range(1, min(per_rank, largest) + 1) if per_rank % b == 0), default=0)
    return batch, (per_rank // batch if batch else 0)


def make_plan(cfg: Config, world_size: int, device: torch.device, memory: int, mfu: float,
              peak_tflops: float | None = None) -> dict:
    """Everything the planner reports, as plain values (the --json object); peak_tflops replaces the
    device's own peak, to plan for a device the planner does not run on."""
    t, m = cfg.train, cfg.model
    precision = resolve_precision(t.precision, device, m, t.batch_size).name
    plan = plan_memory(cfg, world_size, device, precision)
    largest = {ac: plan.largest_batch(memory, ac) for ac in (False, True)}
    batch, accum = keep_global_batch(t.batch_size * t.grad_accum_steps, largest[t.activation_checkpointing])
    non_embedding = meta_model(m).num_params(non_embedding=True)
    global_batch = t.batch_size * t.grad_accum_steps * world_size
    step_flops = flops_per_token(non_embedding, m.n_layers, m.dim, m.context_length) * global_batch * m.context_length
    peak, peak_source = (peak_tflops * 1e12, "--peak-tflops") if peak_tflops else peak_flops(device, precision)
    # checkpointing runs each block's forward twice: 8 of every 6 model FLOPs per token are executed
    executed = step_flops * (8 / 6 if t.activation_checkpointing else 1.0)
    step_s = executed / (world_size * peak * mfu) if peak else None
    return {
        "config": {"strategy": cfg.distributed.strategy, "world_size": world_size, "precision": precision,
                   "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps, "global_batch": global_batch,
                   "activation_checkpointing": t.activation_checkpointing, "optimizer": cfg.optim.name},
        "device": str(device), "device_name": device_name(device), "device_memory_bytes": memory,
        "parameters": plan.parameters, "parameters_per_rank": plan.parameters_per_rank,
        "weights_bytes": plan.weights, "gradients_bytes": plan.gradients,
        "optimizer_state_bytes": plan.optimizer_state, "ddp_buckets_bytes": plan.ddp_buckets,
        "fsdp_gathered_bytes": plan.fsdp_gathered, "optimizer_temporary_bytes": plan.optimizer_temporary,
        "activations_bytes": {"without_checkpointing": plan.activation_bytes(t.batch_size, False),
                              "with_checkpointing": plan.activation_bytes(t.batch_size, True)},
        "peak_bytes": plan.peak_bytes(t.batch_size),
        "fits": plan.peak_bytes(t.batch_size) <= memory,
        "largest_micro_batch": {"without_checkpointing": largest[False], "with_checkpointing": largest[True]},
        "keep_global_batch": {"batch_size": batch, "grad_accum_steps": accum},
        "flops_per_step": step_flops, "peak_flops": peak, "peak_source": peak_source, "mfu": mfu,
        "seconds_per_step": step_s, "max_steps": t.max_steps,
        "seconds_total": step_s * t.max_steps if step_s else None,
    }


def size(n: int) -> str:
    return f"{n / 2 ** 30:,.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:,.1f} MiB"


def report(p: dict) -> list[str]:
    """The plan as lines for a person; every figure is per rank."""
    c, act, big = p["config"], p["activations_bytes"], p["largest_micro_batch"]
    ac = "on" if c["activation_checkpointing"] else "off"
    keep = p["keep_global_batch"]
    lines = [
        f"plan: {c['strategy']} on {c['world_size']} rank(s), {c['precision']}, {c['optimizer']}, "
        f"{p['device_name']} with {size(p['device_memory_bytes'])} each (per rank below)",
        f"parameters        {p['parameters']:,} ({p['parameters_per_rank']:,} on each rank)",
        f"weights           {size(p['weights_bytes'])} (fp32 master copy)",
        f"gradients         {size(p['gradients_bytes'])}",
        f"optimizer state   {size(p['optimizer_state_bytes'])}",
    ]
    if p["ddp_buckets_bytes"]:
        lines.append(f"ddp buckets       {size(p['ddp_buckets_bytes'])} (distributed.gradient_as_bucket_view=false)")
    if p["fsdp_gathered_bytes"]:
        lines.append(f"fsdp gathered     {size(p['fsdp_gathered_bytes'])} (root + 2 blocks unsharded, 1 block's gradient)")
    if p["optimizer_temporary_bytes"]:
        lines.append(f"optimizer step    {size(p['optimizer_temporary_bytes'])} of temporaries (Muon)")
    lines += [
        f"activations       {size(act['without_checkpointing'])} per micro-batch of {c['batch_size']}, "
        f"{size(act['with_checkpointing'])} with activation checkpointing (now {ac})",
        f"peak              {size(p['peak_bytes'])} of {size(p['device_memory_bytes'])}: "
        + ("fits" if p["fits"] else "DOES NOT FIT"),
        f"largest micro-batch that fits: {big['without_checkpointing']:,} without checkpointing, "
        f"{big['with_checkpointing']:,} with",
        f"global batch {c['global_batch']}: " + (
            f"train.batch_size={keep['batch_size']} train.grad_accum_steps={keep['grad_accum_steps']}"
            if keep["batch_size"] else "no micro-batch fits; use more ranks, fsdp or activation checkpointing"),
        f"FLOPs per step    {p['flops_per_step']:.3g} (model FLOPs: 6N + 12*L*d*T per token)",
    ]
    if p["seconds_per_step"] is None:
        lines.append(f"time              unknown: {p['peak_source']}")
    else:
        lines.append(f"time              {p['seconds_per_step']:.3g} s per step, {format_seconds(p['seconds_total'])} "
                     f"for {p['max_steps']:,} steps at {p['mfu']:.0%} MFU of {p['peak_flops'] / 1e12:.3g} TFLOP/s "
                     f"({p['peak_source']})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Predict memory per rank, the largest micro-batch and the time of a run.",
                            epilog="Overrides: section.key=value ... (e.g. train.batch_size=8)")
    parser.add_argument("--config", type=utf8_text, default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--world-size", type=number(int, 1, 1 << 20, "processes"), default=1,
                        help="processes (ranks) the run will use (default 1)")
    parser.add_argument("--device", default=None, help=f"{DEVICE_CHOICES} (default auto: CUDA, then MPS, then CPU)")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="memory of one rank's device, e.g. 80GiB (default: this device's total)")
    parser.add_argument("--mfu", type=number(float, 0, 1, "a fraction of the peak", above=True), default=DEFAULT_MFU,
                        help=f"assumed model FLOPs utilisation for the time estimate (default {DEFAULT_MFU})")
    parser.add_argument("--peak-tflops", type=number(float, 0, 1e9, "TFLOP/s", above=True), default=None,
                        help="peak TFLOP/s for the time estimate, e.g. 989 (H100 bf16) (default: this device's)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the report")

    def body() -> int:
        args, overrides = parser.parse_known_args(argv)  # inside: a usage error is one line too
        require_stdout("the plan")
        for item in overrides:
            if item.startswith("-"):
                parser.error(f"unrecognized argument: {item}")
        cfg = load_config(args.config, overrides)
        memory = parse_bytes(args.device_memory) if args.device_memory is not None else None
        device = resolve_device(args.device)
        memory = device_memory(device) if memory is None else memory
        plan = make_plan(cfg, args.world_size, device, memory, args.mfu, args.peak_tflops)
        print(json.dumps(plan) if args.json else "\n".join(report(plan)))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

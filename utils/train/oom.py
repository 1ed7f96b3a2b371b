"""Out-of-memory back-off: the smaller micro-batch that keeps the global batch, freeing what the
failed step held, the CUDA memory history a user can ask for, and a resume adopting the back-off.

The global batch (batch_size x grad_accum_steps x world_size) and the order of its windows are the
BatchPlan's (data/dataset.py): dividing the micro-batch by k and multiplying the accumulation by k
trains on the same windows with the same mean loss, so the math is unchanged up to rounding.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch

from models.config import Config


def smaller_micro_batch(batch_size: int) -> int | None:
    """The largest divisor of batch_size at most half of it (half when even); None at 1."""
    return next((d for d in range(batch_size // 2, 0, -1) if batch_size % d == 0), None)


def free_memory(device: torch.device) -> None:
    """Return what the failed step held (activations, partial gradients) to the allocator and the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def start_memory_history(device: torch.device) -> bool:
    """Record every CUDA allocation's stack so an OOM snapshot shows who held the memory."""
    if device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    return True


def dump_memory_snapshot(folder: Path, run_name: str, step: int) -> Path:
    path = folder / f"{run_name}.oom_step{step:07d}.pickle"
    torch.cuda.memory._dump_snapshot(str(path))
    return path


def adopt_backoff(cfg: Config, saved_config: dict) -> tuple[Config, str | None]:
    """On resume, the micro-batch a backed-off run had settled on (same global batch, smaller micro-batch)."""
    saved = saved_config.get("train", {})
    batch, accum = saved.get("batch_size"), saved.get("grad_accum_steps")
    t = cfg.train
    if not batch or batch >= t.batch_size or batch * accum != t.batch_size * t.grad_accum_steps:
        return cfg, None
    line = (f"resuming with train.batch_size={batch} and train.grad_accum_steps={accum} (the run backed off from "
            f"{t.batch_size} x {t.grad_accum_steps} after running out of memory; same global batch)")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=batch, grad_accum_steps=accum)), line

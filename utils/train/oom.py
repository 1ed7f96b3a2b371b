"""Out-of-memory back-off: the smaller micro-batch that keeps the global batch, freeing what the
failed step held, and the CUDA memory history a user can ask for (the Trainer backs off; the
micro-batch it settles on is run state, in every checkpoint).

The global batch (batch_size x grad_accum_steps x world_size) and the order of its windows are the
BatchPlan's (data/dataset.py): dividing the micro-batch by k and multiplying the accumulation by k
trains on the same windows with the same mean loss, so the math is unchanged up to rounding.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch



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

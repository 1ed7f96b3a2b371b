"""train_ddp.py with a poisoned data window, or with windows skipped: the rollback equivalence across ranks.

    POISON=45,46        the windows of these data steps (0-based plan indices) get random targets: the loss jumps
    POISON_NAN_RANK=1   instead, on that rank only, every target is the ignored index: its loss is NaN (0/0)
    SKIP_AHEAD=40:6     from data step 40 on, every rank reads 6 data steps further (the windows never seen)

The patch is on BatchPlan.batch from outside, so the product code carries no test hooks.
"""

import os
import sys

import torch

import train_ddp
from data.dataset import BatchPlan


def patch(poison: set[int], nan_rank: int | None, skip_from: int, skip_by: int) -> None:
    batch = BatchPlan.batch

    def patched(self: BatchPlan, step: int, micro_step: int, device: torch.device):
        step += skip_by if step >= skip_from else 0
        x, y = batch(self, step, micro_step, device)
        if step in poison and nan_rank is not None:
            y = torch.full_like(y, -1) if self.rank == nan_rank else y
        elif step in poison:
            y = torch.randint(0, 256, y.shape, generator=torch.Generator().manual_seed(step)).to(device)
        return x, y

    BatchPlan.batch = patched


if __name__ == "__main__":
    skip_from, skip_by = (int(v) for v in os.environ.get("SKIP_AHEAD", "0:0").split(":"))
    nan_rank = int(os.environ["POISON_NAN_RANK"]) if "POISON_NAN_RANK" in os.environ else None
    patch({int(s) for s in os.environ.get("POISON", "").split(",") if s}, nan_rank, skip_from, skip_by)
    sys.exit(train_ddp.main())

"""train_ddp.py (or, with COUNT_SINGLE=1, train_single.py) counting, per optimizer step, what makes the host wait
for the device (a read of a tensor's value: item, tolist, bool, float, int, cpu, numpy) and every collective
called from Python (DDP's gradient all-reduce runs in its C++ reducer, so it is not among them).

    COUNT_SYNCS=DIR    each rank writes DIR/rank<R>.json: {"steps": {step: [reads, collectives]}, "read_points": [...]}

Everything from the start of step n to the start of step n + 1 (its read, log line, evaluation, save) counts for
step n. The wrappers are installed from outside, so the product carries no test hooks.
"""

import atexit
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from utils.train.trainer import Trainer

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_gather_object", "broadcast_object_list", "gather", "scatter", "barrier", "all_to_all", "reduce")
counts: dict[int, list[int]] = {}
read_points: list[int] = []
current = [0]  # the step being counted; 0 = start-up


def counting(kind: int, original):
    def wrapper(*args, **kwargs):
        counts.setdefault(current[0], [0, 0])[kind] += 1
        return original(*args, **kwargs)
    return wrapper


def install(out: Path) -> None:
    for name in READS:
        setattr(torch.Tensor, name, counting(0, getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        setattr(dist, name, counting(1, getattr(dist, name)))
    advance, read = Trainer.advance, Trainer.read

    def counted_advance(self: Trainer) -> None:
        current[0] = self.step + 1
        advance(self)

    def counted_read(self: Trainer) -> bool:
        if self._pending:
            read_points.append(current[0])
        return read(self)

    Trainer.advance, Trainer.read = counted_advance, counted_read
    out.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: (out / f"rank{rank}.json").write_text(json.dumps({"steps": counts,
                                                                              "read_points": read_points})))


if __name__ == "__main__":
    install(Path(os.environ["COUNT_SYNCS"]))
    if os.environ.get("COUNT_SINGLE"):
        import train_single
        sys.exit(train_single.main())
    import train_ddp
    sys.exit(train_ddp.main())

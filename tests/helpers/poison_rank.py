"""train_ddp.py with one rank's loss made NaN, to show the ranks still decide every step alike.

    POISON_RANK=1 POISON_STEPS=2,3      that rank's loss is NaN at those optimizer steps ("all": every step)
    RECORD_SCALE=DIR                    each rank appends (step, GradScaler scale) after every step to
                                        DIR/rank<R>.jsonl

The probes wrap Trainer.advance from outside, so the product code carries no test hooks.
"""

import json
import os
import sys
from pathlib import Path

import train_ddp
from utils.train.trainer import Trainer


def poison(rank: int, steps: str, record: Path | None) -> None:
    advance = Trainer.advance

    def poisoned_advance(self: Trainer):
        hook = None
        if self.info.rank == rank and (steps == "all" or str(self.step) in steps.split(",")):
            # a NaN loss: its gradients, all-reduced, are NaN on every rank, but only this rank sees the loss
            hook = self.raw.register_forward_hook(lambda m, args, out: (out[0], out[1] * float("nan")))
        try:
            advance(self)
        finally:
            if hook is not None:
                hook.remove()
        if record is not None:  # the step read back at once (it changes no result, only when they are read)
            self.read()
            with open(record / f"rank{self.info.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "scale": self.scaler.get_scale(),
                                    "applied": self.last_applied}) + "\n")

    Trainer.advance = poisoned_advance


if __name__ == "__main__":
    record = Path(os.environ["RECORD_SCALE"]) if "RECORD_SCALE" in os.environ else None
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
    poison(int(os.environ["POISON_RANK"]), os.environ["POISON_STEPS"], record)
    sys.exit(train_ddp.main())

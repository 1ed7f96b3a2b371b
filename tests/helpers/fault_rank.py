"""train_ddp.py (or, with FAULT_SINGLE=1, train_single.py) with one fault injected from outside, on one
rank or on every rank, from optimizer step FAULT_STEP on:

    FAULT=oom_forward     the forward of micro-batches larger than FAULT_LIMIT raises torch.OutOfMemoryError
    FAULT=oom_backward    ... their backward does (at its first node, as an allocation there would)
    FAULT=nonfinite       the loss is NaN at that step only
    FAULT=spike           the loss (and so its gradients) is 10 times larger at that step only
    FAULT=compile         torch.compile's model fails at its first call (the warm-up)
    FAULT=side_writer     rank 0's metrics.jsonl write fails with a full disk at that step
    FAULT=sigterm_in_save the rank sends itself SIGTERM in the middle of its first save at or after that step
    FAULT_RANK=1 | all    where (default 1)

The faults wrap GPT.forward, Trainer.advance, Checkpointer.save and torch.compile from outside, so the
product carries no test hooks.
"""

import os
import signal
import sys

import torch
import torch.nn as nn

from models.transformer import GPT
from utils.checkpoint.folder import Checkpointer
from utils.metrics import sinks
from utils.train.trainer import Trainer

FAULT, STEP = os.environ.get("FAULT", "none"), int(os.environ.get("FAULT_STEP", "3"))
LIMIT = int(os.environ.get("FAULT_LIMIT", "0"))
RANK = int(os.environ.get("RANK", "0"))
HERE = os.environ.get("FAULT_RANK", "1") in ("all", str(RANK))
state = {"step": 0}


class RaiseInBackward(torch.autograd.Function):
    """The identity whose backward runs out of memory at its first node, as an allocation there would
    (also tests/test_oom.py's)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected in backward)")


def install() -> None:
    advance, forward = Trainer.advance, GPT.forward

    def counted_advance(self: Trainer) -> None:
        state["step"] = self.step + 1
        return advance(self)

    def faulty_forward(self: GPT, idx, targets=None, pos=0):
        due = HERE and self.training and targets is not None and state["step"] >= STEP
        if due and FAULT == "oom_forward" and idx.shape[0] > LIMIT:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected in forward)")
        logits, loss = forward(self, idx, targets, pos)
        if due and FAULT == "spike" and state["step"] == STEP:
            loss = loss * 10
        if due and FAULT == "oom_backward" and idx.shape[0] > LIMIT:
            loss = RaiseInBackward.apply(loss)
        if due and FAULT == "nonfinite" and state["step"] == STEP:
            loss = loss * float("nan")
        return logits, loss

    Trainer.advance, GPT.forward = counted_advance, faulty_forward
    if FAULT == "compile":  # the failing rank(s) as a missing toolchain fails; the others compile cheaply
        compile_ = torch.compile

        def failing_compile(model: nn.Module, *args, **kwargs) -> nn.Module:
            if not HERE:
                return compile_(model, backend="eager")  # dynamo without inductor: seconds, not a minute

            class Failing(nn.Module):  # what torch.compile returns, failing at its first call
                def __init__(self) -> None:
                    super().__init__()
                    self._orig_mod = model

                def forward(self, *a, **k):
                    raise RuntimeError("injected: inductor could not find a C++ compiler")
            return Failing()
        module_compile = nn.Module.compile

        def failing_module_compile(self: nn.Module, *args, **kwargs) -> None:  # FSDP compiles block by block
            if not HERE:
                return module_compile(self, backend="eager")
            self.forward = lambda *a, **k: failing_compile(self)()
        torch.compile, nn.Module.compile = failing_compile, failing_module_compile
    if FAULT == "side_writer" and RANK == 0:  # rank 0 alone writes the logs
        write = sinks.JsonlSink.scalars

        def full_disk(self, step, values):
            if step >= STEP:
                raise OSError(28, "No space left on device")
            return write(self, step, values)
        sinks.JsonlSink.scalars = full_disk
    if FAULT == "sigterm_in_save" and HERE:
        save = Checkpointer.save

        def interrupted_save(self, model, optimizer, extra, step):
            if step >= STEP and not state.get("sent"):
                state["sent"] = True
                os.kill(os.getpid(), signal.SIGTERM)
            return save(self, model, optimizer, extra, step)
        Checkpointer.save = interrupted_save


if __name__ == "__main__":
    install()
    if os.environ.get("FAULT_SINGLE"):
        import train_single
        sys.exit(train_single.main())
    import train_ddp
    sys.exit(train_ddp.main())

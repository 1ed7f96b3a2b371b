"""train_ddp.py with optional test probes for the FSDP tests, switched on by environment variables.

    LOGITS_OUT=FILE     after training, the trained (still sharded) model's logits on a fixed input
                        are saved to FILE by rank 0; every rank takes part in the forward
    KILL_AT_STEP=N      rank 0 SIGKILLs itself while saving step N: after every shard, DCP's
                        .metadata and extra.pt are written, just before the folder is renamed
    AUTO_MEASURES=bf16  train.precision=auto's CPU measurement (on rank 0) finds bf16 faster
    GATHERED_DTYPE=FILE each rank appends the dtype its first block's qkv weight has in the forward
                        (FSDP's all-gathered parameter) to FILE

The probes wrap functions from outside, so the product code carries no test hooks.
"""

import os
import signal
import sys
from pathlib import Path


import torch

import train_ddp
from utils import precision
from utils.checkpoint import sharded as sharded_checkpoint
from utils.train.trainer import Trainer

PROBE_INPUT = torch.arange(32)[None] * 7 % 256  # (1, 32) bytes


def save_logits(out: Path) -> None:
    fit = Trainer.fit

    def fit_then_logits(self: Trainer) -> int:
        code = fit(self)
        self.model.eval()
        with torch.no_grad():
            logits, _ = self.model(PROBE_INPUT.to(self.info.device))
        if self.info.is_main:
            torch.save(logits, out)
        return code

    Trainer.fit = fit_then_logits


def kill_at(step: int) -> None:
    publish = sharded_checkpoint._publish

    def die_before_publish(tmp: Path, folder: Path) -> None:
        if folder.name == f"step_{step:07d}":
            os.kill(os.getpid(), signal.SIGKILL)
        publish(tmp, folder)

    sharded_checkpoint._publish = die_before_publish


def auto_measures(name: str) -> None:
    measure = precision.measure_cpu_bf16
    precision.measure_cpu_bf16 = lambda *args, **kwargs: {**measure(*args, **kwargs), "precision": name}


def record_gathered_dtype(out: Path) -> None:
    init = Trainer.__init__

    def recording_init(self: Trainer, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        qkv = self.raw.blocks[0].attn.qkv

        def record(module, inputs) -> None:
            with open(out, "a") as f:
                f.write(f"{module.weight.dtype}\n")

        qkv.register_forward_pre_hook(record)

    Trainer.__init__ = recording_init


if __name__ == "__main__":
    if "LOGITS_OUT" in os.environ:
        save_logits(Path(os.environ["LOGITS_OUT"]))
    if "KILL_AT_STEP" in os.environ:
        kill_at(int(os.environ["KILL_AT_STEP"]))
    if "AUTO_MEASURES" in os.environ:
        auto_measures(os.environ["AUTO_MEASURES"])
    if "GATHERED_DTYPE" in os.environ:
        record_gathered_dtype(Path(os.environ["GATHERED_DTYPE"]))
    sys.exit(train_ddp.main())

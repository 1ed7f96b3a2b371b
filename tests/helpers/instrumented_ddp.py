"""train_ddp.py with optional test probes, switched on by environment variables.

    RECORD_BATCHES=DIR                    each rank appends the windows it trains on to DIR/rank<R>.jsonl
    RECORD_RANKS=DIR                      each rank writes its DistInfo (backend None: no group), torchrun's
                                          GROUP_RANK and its parent's pid (its torchrun agent) to DIR/rank<R>.json
    FAIL_RANK=1 FAIL_AT_STEP=2            that rank raises in Trainer.advance at that step (a fault, not a hang)
    RANK1_OVERRIDES="optim.lr=0.5 ..."    overrides appended on rank 1 only: ranks that disagree
    RECORD_THREADS=DIR                    each rank writes how many gloo worker threads its process group
                                          started, and how many are left once train_ddp.main returned (or raised)
    COUNT_BROADCASTS=DIR                  each rank writes how many coalesced broadcasts (DDP's buffer sync)
                                          it made after DDP was built, and the wrapped model's buffers
    SLOW_SAVE_S=SECONDS                   each checkpoint file is written that many seconds late (a big model's save)

The probes wrap the library's methods and functions from outside, so the product code carries no test hooks.
"""

import contextlib
import json
import os
import sys
import time
from pathlib import Path


import torch.distributed as dist

import train_ddp
import utils.checkpoint.folder as checkpointer
from utils.distributed import parallel
from utils.train import run
from data.dataset import BatchPlan
from utils.train.trainer import Trainer


def record_batches(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    batch = BatchPlan.batch

    def recording_batch(self: BatchPlan, step: int, micro_step: int, device):
        with open(out / f"rank{self.rank}.jsonl", "a") as f:
            starts = [int(s) for s in self.window_starts(step, micro_step)]
            f.write(json.dumps({"step": step, "micro_step": micro_step, "starts": starts}) + "\n")
        return batch(self, step, micro_step, device)

    BatchPlan.batch = recording_batch


def record_ranks(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    init = Trainer.__init__

    def recording_init(self: Trainer, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        info = self.info
        record = {"rank": info.rank, "local_rank": info.local_rank, "world_size": info.world_size,
                  "device": str(info.device), "backend": info.backend, "group_rank": int(os.environ["GROUP_RANK"]),
                  "agent_pid": os.getppid()}
        (out / f"rank{info.rank}.json").write_text(json.dumps(record))

    Trainer.__init__ = recording_init


def fail_at(rank: int, step: int) -> None:
    advance = Trainer.advance

    def failing_advance(self: Trainer):
        if self.info.rank == rank and self.step == step:
            raise RuntimeError(f"injected fault on rank {rank} at step {step}")
        return advance(self)

    Trainer.advance = failing_advance


def gloo_workers() -> int:
    """Gloo's worker threads in this process, by the name torch gives them, as the kernel lists them."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            names.append((task / "comm").read_text().strip())
    return names.count("pt_gloo_runloop")


def record_threads() -> dict:
    """Counted after the run's first collective (the ranks comparing configs), whether or not they agree."""
    record: dict = {}
    check = run.check_ranks_agree

    def counting_check(*args, **kwargs) -> None:
        try:
            check(*args, **kwargs)
        finally:
            record["started"] = gloo_workers()

    run.check_ranks_agree = counting_check
    return record


def count_broadcasts() -> dict:
    """DDP's constructor broadcasts the weights once; after that, a buffer sync is the only coalesced broadcast."""
    wrap, broadcast = parallel.ddp_wrap, dist._broadcast_coalesced
    record = {"after_wrap": 0}

    def counting_broadcast(*args, **kwargs):
        record["after_wrap"] += 1
        return broadcast(*args, **kwargs)

    def counting_wrap(model, info, cfg):
        wrapped = wrap(model, info, cfg)
        record["buffers"] = [name for name, _ in wrapped.named_buffers()]
        dist._broadcast_coalesced = counting_broadcast
        return wrapped

    parallel.ddp_wrap = counting_wrap
    return record


def slow_save(seconds: float) -> None:
    save = checkpointer.save_checkpoint

    def slow(*args, **kwargs) -> None:
        time.sleep(seconds)
        save(*args, **kwargs)

    checkpointer.save_checkpoint = slow


def write_record(variable: str, record: dict) -> None:
    out = Path(os.environ[variable])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    if "RECORD_BATCHES" in os.environ:
        record_batches(Path(os.environ["RECORD_BATCHES"]))
    if "RECORD_RANKS" in os.environ:
        record_ranks(Path(os.environ["RECORD_RANKS"]))
    if "FAIL_RANK" in os.environ:
        fail_at(int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_AT_STEP"]))
    if "SLOW_SAVE_S" in os.environ:
        slow_save(float(os.environ["SLOW_SAVE_S"]))
    if os.environ.get("RANK") == "1" and "RANK1_OVERRIDES" in os.environ:
        sys.argv += os.environ["RANK1_OVERRIDES"].split()
    threads = record_threads() if "RECORD_THREADS" in os.environ else None
    broadcasts = count_broadcasts() if "COUNT_BROADCASTS" in os.environ else None
    try:
        sys.exit(train_ddp.main())
    finally:
        if threads is not None:
            write_record("RECORD_THREADS", {**threads, "after": gloo_workers()})
        if broadcasts is not None:
            write_record("COUNT_BROADCASTS", broadcasts)

"""Process-group life: who am I (torchrun, plain srun, or a single process), setup, collectives, teardown."""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ContextManager

import torch
import torch.distributed as dist
import torch.nn as nn

from models.config import DistributedConfig
from utils.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun, else from srun, else a single process.

    Under plain srun (no torchrun) the rendezvous address is the allocation's first node.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[03-05,9],cpu1' -> 'gpu03' (as `scontrol show hostnames`)."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist).group(0)  # up to the first comma outside brackets
    # every bracket, e.g. both in 'rack[1-2]-node[01-04]', starts at its first number
    return re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", first)


def init_distributed(cfg: DistributedConfig, device_arg: str | None = None) -> DistInfo:
    """Join the process group if launched by torchrun or srun; otherwise a world of one."""
    rank, local_rank, world_size = env_ranks()
    device = resolve_device(device_arg, local_rank)
    if world_size == 1:
        return DistInfo(0, 0, 1, device, None)
    if "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
        os.environ["MASTER_ADDR"] = slurm_master_addr(os.environ["SLURM_JOB_NODELIST"])
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=cfg.timeout_s))
    return DistInfo(rank, local_rank, world_size, device, backend)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if flag is True on any rank (e.g. a preemption signal)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """rank 0's obj on every rank."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's obj, in rank order, on every rank."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers, so saved keys carry no prefixes."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def maybe_no_sync(model: nn.Module, sync: bool) -> ContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-step; DDP syncs on that one."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()

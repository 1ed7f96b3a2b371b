"""Process-group life: setup (device, backend, store, watchdog), collectives, teardown."""

from __future__ import annotations

import gc
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ContextManager, Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any group: its functions' defaults would hold group.WORLD for good
import torch.nn as nn

from models.config import DistributedConfig
from utils.device import resolve_device
from utils.errors import UserError
from utils.malloc import return_freed_memory
from utils.distributed.rendezvous import env_ranks, join
from utils.distributed.watchdog import Watchdog


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


@contextmanager
def process_group(cfg: DistributedConfig, device_arg: str | None = None) -> Iterator[DistInfo]:
    """The process group for the with-block if launched by torchrun or srun, otherwise a world of one.

    The group gets a store of its own (utils/distributed/rendezvous.py: a restarted group must not read the keys of
    the one before) and a watchdog (utils/distributed/watchdog.py: a rank that ends early ends the others at once).
    The group is freed, its threads joined, when the with-block ends (_free_group), so the objects built on
    it must not outlive the block.
    """
    rank, local_rank, world_size = env_ranks()
    device = resolve_device(device_arg, local_rank)
    if world_size == 1:
        yield DistInfo(0, 0, 1, device, None)
        return
    if device.type == "cpu" and cfg.strategy == "fsdp":
        return_freed_memory()  # before the model: glibc would keep FSDP's gathered blocks (utils/malloc.py)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"distributed.backend=nccl runs on CUDA devices only, and this rank runs on {device}; use "
                        f"distributed.backend=gloo (or auto)")
    timeout = timedelta(seconds=cfg.timeout_s)
    store, host = join(rank, world_size, timedelta(seconds=cfg.join_timeout_s))
    store.set_timeout(timeout)
    watchdog = Watchdog(store, rank, world_size, host)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        yield DistInfo(rank, local_rank, world_size, device, backend)
    except BaseException as e:
        # a UserError is this rank's own verdict; anything else may be a collective failing for a dead peer
        watchdog.stop(finished=False, error_may_be_a_peers=not isinstance(e, UserError))
        traceback.clear_frames(e.__traceback__)  # the frames it was raised from hold the model, the model the group
        _free_group()
        raise
    _free_group()
    watchdog.stop(finished=True)


def _free_group() -> None:
    """Destroy the group and free it now, which joins its backend's threads. Otherwise it lives on in the
    objects that used it until interpreter exit, and a gloo worker still releasing the last collective's
    tensors then needs the GIL as the interpreter goes away: SIGABRT ("terminate called without an active
    exception") after a run that succeeded."""
    group = dist.group.WORLD
    dist.destroy_process_group()
    for mesh in _meshes:  # DTensor's caches keep the mesh, and a mesh of newer torch its groups
        getattr(mesh, "_pg_registry", {}).clear()
    _meshes.clear()
    gc.collect()  # DDP's reducer, in a reference cycle
    # The last reference goes here, not in a reducer freed by the collection: ProcessGroup's own
    # destructor lets go of the GIL while it joins the workers, which may need it for that release.
    del group


_meshes: list[Any] = []  # the device meshes built on the current group (group_mesh), let go with it


def group_mesh(info: DistInfo) -> Any:
    """The 1-D device mesh over every rank of the group (FSDP2 shards over it), released with the group."""
    from torch.distributed.device_mesh import init_device_mesh  # DTensor: about 1.5 s, so only when used

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    _meshes.append(mesh)
    return mesh


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


def without_ddp(model: nn.Module) -> nn.Module:
    """The module DDP wraps (forward without DDP's buffer broadcast or gradient hooks); others as they are."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
    """Skip the gradient reduction on all but the last micro-step: DDP's all-reduce (no_sync), or
    FSDP2's reduce-scatter (set_requires_gradient_sync; gradients then accumulate unsharded)."""
    if sync:
        return nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule (utils/distributed/parallel.py)
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)

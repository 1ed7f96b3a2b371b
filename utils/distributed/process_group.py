"""Process-group life: setup (device, backend, store, watchdog), collectives, teardown."""

from __future__ import annotations

import gc
import time
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
from utils.device import check_gpu_per_rank, resolve_device
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
    """The process group for the with-block if launched by torchrun or srun, otherwise a world of one: no group,
    unless distributed.backend names one, which then starts for real in a group of one (_group_of_one).

    The group gets a store of its own (utils/distributed/rendezvous.py: a restarted group must not read the keys of
    the one before) and a watchdog (utils/distributed/watchdog.py: a rank that ends early ends the others at once).
    The group is freed, its threads joined, when the with-block ends (_free_group), so the objects built on
    it must not outlive the block.
    """
    rank, local_rank, world_size = env_ranks()
    device = resolve_device(device_arg, local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"distributed.backend=nccl runs on CUDA devices only, and this rank runs on {device}; use "
                        f"distributed.backend=gloo (or auto)")
    check_gpu_per_rank(backend, device)
    if world_size == 1:
        if cfg.backend == "auto":
            yield DistInfo(0, 0, 1, device, None)
        else:  # a backend named for one rank (gpu_check's NCCL row) is started for real, not skipped
            with _group_of_one(backend, device) as info:
                yield info
        return
    if device.type == "cpu" and cfg.sharded:
        return_freed_memory()  # before the model: glibc would keep FSDP's gathered blocks (utils/malloc.py)
    timeout = timedelta(seconds=cfg.timeout_s)
    store, host = join(rank, world_size, timedelta(seconds=cfg.join_timeout_s))
    store.set_timeout(timeout)
    _stores[:] = [store]
    watchdog = Watchdog(store, rank, world_size, host)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        yield DistInfo(rank, local_rank, world_size, device, backend)
    except BaseException as e:
        # a UserError is this rank's own verdict; anything else may be a collective failing for a dead peer
        from_a_collective = not isinstance(e, UserError)
        watchdog.stop(finished=False, error_may_be_a_peers=from_a_collective,
                      peer_gone=from_a_collective and any(s in str(e) for s in PEER_GONE))
        traceback.clear_frames(e.__traceback__)  # the frames it was raised from hold the model, the model the group
        _free_group()
        raise
    _free_group()
    watchdog.stop(finished=True)


# what gloo and NCCL say when a peer's process ended in the middle of a collective
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


@contextmanager
def _group_of_one(backend: str, device: torch.device) -> Iterator[DistInfo]:
    """A one-rank group of `backend` on an in-memory store (nothing to meet), its communicator made at once by
    one all-reduce (NCCL makes it at the first collective); freed, as a group of many, when the block ends."""
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        dist.all_reduce(torch.ones(1, device=device))
        yield DistInfo(0, 0, 1, device, backend)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # as in process_group: the frames hold the model, the model the group
        _free_group()
        raise
    _free_group()


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
    _stores.clear()
    gc.collect()  # DDP's reducer, in a reference cycle
    # The last reference goes here, not in a reducer freed by the collection: ProcessGroup's own
    # destructor lets go of the GIL while it joins the workers, which may need it for that release.
    del group


_meshes: list[Any] = []  # the device meshes built on the current group (group_mesh), let go with it
_stores: list[dist.Store] = []  # the current group's store (agree_by_store)


def group_mesh(info: DistInfo) -> Any:
    """The 1-D device mesh over every rank of the group (FSDP2 shards over it), released with the group."""
    from torch.distributed.device_mesh import init_device_mesh  # DTensor: about 1.5 s, so only when used

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    _meshes.append(mesh)
    return mesh


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree_by_store(key: str, value: str, info: DistInfo, timeout_s: float) -> list[str] | None:
    """Every rank's value for key, in rank order, if every rank gives one within timeout_s; else None (a rank
    that does not is inside a collective waiting for this one). Through the group's store, so a rank that
    cannot join a collective can still ask."""
    store = _stores[0]
    store.set(f"{key}/{info.rank}", value)
    keys = [f"{key}/{r}" for r in range(info.world_size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):  # not store.wait: its timeout logs C++ warnings on stderr
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return [store.get(k).decode() for k in keys]


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

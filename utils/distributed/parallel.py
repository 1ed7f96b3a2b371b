"""Parallelism applied from outside the model (torchtitan's `parallelize`): DDP or FSDP2, by
`distributed.strategy`, plus the gradient-norm helper that works on both.

The model stays a plain GPT. DDP wraps it; FSDP2 (`fully_shard`) shards each block and then the
root (embeddings, final norm, head) in place, so parameter names and `unwrap` are unchanged and
the optimizer is built on the sharded (DTensor) parameters afterwards. With one process FSDP has
nothing to shard: the model stays as it is and only the checkpoint format differs.

On several ranks FSDP's model is built on the meta device, sharded there, and only then given storage
(`materialize`): each rank allocates and initialises its own shards, so no rank ever holds the whole
model, and the weights are the ones every other strategy starts from (models/init.py).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from models.config import DistributedConfig
from models.transformer import GPT
from utils.distributed.process_group import DistInfo, group_mesh, unwrap, without_ddp
from utils.precision import Precision


def ddp_wrap(model: nn.Module, info: DistInfo, cfg: DistributedConfig) -> nn.Module:
    if info.world_size == 1:
        return model
    ddp = nn.parallel.DistributedDataParallel
    # the only buffers, the RoPE tables, are a function of the config and alike on every rank: no broadcast of
    # them from rank 0 before each forward (the flag's name from torch 2.13, which deprecates broadcast_buffers)
    flag = "forward_sync_buffers"
    if flag not in inspect.signature(ddp).parameters:
        flag = "broadcast_buffers"
    return ddp(model, device_ids=[info.device.index] if info.device.type == "cuda" else None, **{flag: False},
               bucket_cap_mb=cfg.bucket_cap_mb, gradient_as_bucket_view=cfg.gradient_as_bucket_view,
               static_graph=cfg.static_graph)


def shards(cfg: DistributedConfig, info: DistInfo) -> bool:
    """FSDP over several ranks: the model is sharded, so it is built on the meta device (materialize)."""
    return cfg.sharded and info.world_size > 1


def fsdp_wrap(model: nn.Module, info: DistInfo, precision: Precision) -> nn.Module:
    """Shard every block, then the root. Returns the plain (now sharded) model.

    Activation checkpointing is the model's own per-block `checkpoint(block, ...)`, which
    composes with the block's FSDP hooks (the recompute all-gathers the block again). A model
    compiled whole by the trainer is recompiled per block (`Module.compile`, which keeps the
    parameter names): FSDP's hooks then stay outside every compiled region, as torchtitan does.
    fp16 is refused once the precision is resolved (FSDP2 has no sharded GradScaler).
    """
    raw = unwrap(model)
    if info.world_size == 1:
        return model
    # imported here: FSDP pulls in DTensor, about 1.5 s at every start of a run that does not use it
    try:  # torch 2.6+
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    compiled = raw is not model
    # bf16: compute in bf16, reduce-scatter gradients in fp32 so the sum over ranks loses nothing
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision.name == "bf16" else MixedPrecisionPolicy()
    mesh = group_mesh(info)
    for block in raw.blocks:
        if compiled:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(raw, mesh=mesh, mp_policy=mp)
    return raw


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """full laid out as `like`: full itself, or for a DTensor (an FSDP shard) the DTensor of this rank's part."""
    if not hasattr(like, "device_mesh"):
        return full
    try:  # torch 2.5+
        from torch.distributed.tensor import distribute_tensor
    except ImportError:
        from torch.distributed._tensor import distribute_tensor
    try:  # torch 2.7+: each rank slices its own copy, no scatter from rank 0
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:
        return distribute_tensor(full, like.device_mesh, like.placements)


def materialize(model: GPT, device: torch.device, seed: int) -> None:
    """Storage and initial values for a GPT built on the meta device and sharded (fsdp_wrap): each rank
    allocates its shards only, and keeps its part of each full parameter, generated one at a time."""
    model.to_empty(device=device)
    model.init_weights(seed, place=local_part)


def compiled_as(model: nn.Module) -> str | None:
    """How the training model is compiled: "whole" (torch.compile's wrapper, under DDP too), "per block"
    (Module.compile in place, as fsdp_wrap does), or None (eager)."""
    if hasattr(without_ddp(model), "_orig_mod"):
        return "whole"
    # Module.compile() keeps the module and sets its compiled call (torch 2.2+)
    if any(getattr(block, "_compiled_call_impl", None) is not None for block in unwrap(model).blocks):
        return "per block"
    return None


def parallelize(model: nn.Module, info: DistInfo, cfg: DistributedConfig, precision: Precision) -> nn.Module:
    """The model as distributed.strategy wants it for training on info.world_size processes, in the run's
    resolved precision (never the config's `auto`)."""
    if cfg.sharded:
        return fsdp_wrap(model, info, precision)
    return ddp_wrap(model, info, cfg)


def finish_reduction(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], reducer_waits: bool) -> bool:
    """After this rank's forward or backward failed (out of memory), take its part in the gradient all-reduce
    that the other ranks wait in, with zero gradients, so that the group meets again; False where that cannot
    be done: under FSDP every forward and backward gathers and scatters block by block, which a rank that
    failed half-way cannot replay.

    A tiny batch through DDP, whose forward prepares the reducer; or, where the reducer already waits for
    this step's backward (the failure was in it), through the plain module, whose gradients' hooks still
    report to that reducer. Fails (False) if the failed backward had already reported some of them."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return False
    x, y = (t[:1, :1] for t in batch)
    try:
        _, loss = (unwrap(model) if reducer_waits else model)(x, y)
        (loss * 0).backward()
    except (torch.OutOfMemoryError, RuntimeError):
        return False
    finally:
        model.zero_grad(set_to_none=True)
    return True


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over every parameter; the total norm as a plain tensor.

    Under FSDP the gradients are DTensor shards: clip_grad_norm_ reduces the norm over ranks and
    returns a replicated DTensor, which full_tensor() turns into an ordinary tensor.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

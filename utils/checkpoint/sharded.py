"""Sharded checkpoints (torch.distributed.checkpoint, DCP): one folder per save, written by every
rank in parallel, loadable on any number of ranks (DCP reshards on load).

A folder holds DCP's shard files (`__R_0.distcp`, ...) with its `.metadata`, plus `extra.pt` (the
small non-tensor state: trainer counters, scheduler, scaler, RNG, config) and `checksums.json` (the
CRC-32 of every shard and of `.metadata`, each rank hashing a share of the files). Every rank writes
into a hidden temporary folder; rank 0 renames it into place only after DCP has written `.metadata`
(the last file, once every rank's shards are written) and extra.pt is fsynced. So a crash at any
moment leaves either the complete folder or none, and `verify_folder` refuses a folder with a shard
missing, cut short or changed since (a flipped bit).

Plain functions; the caller decides the folder names and when to save. The model may be FSDP2
sharded, DDP-wrapped's inner module, or plain; without a process group DCP runs in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from utils.checkpoint.format import (CONFIG, FORMAT, MODEL, OPTIMIZER, CheckpointError, check_shapes, check_state,
                                     verify_crc)

EXTRA = "extra.pt"
METADATA = ".metadata"
CHECKSUMS = "checksums.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _checksums(tmp: Path) -> dict[str, str]:
    """Collective: the CRC-32 of every file DCP wrote, each rank hashing every world_size-th one (the
    files are fresh in the page cache of the node that wrote them, or of the shared file system)."""
    files = sorted(p.name for p in tmp.iterdir() if p.name != EXTRA)
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = {name: crc32(tmp / name) for name in files[_rank()::world]}
    if not dist.is_initialized():
        return mine
    shares: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(shares, mine)
    return {name: crc for share in shares for name, crc in (share or {}).items()}


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the complete temporary folder into place; an older folder of the same name goes last."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync_tree(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra_state: dict) -> None:
    """Collective: every rank writes its shards; returns once the folder is complete on every rank."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed mid-save
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({MODEL: model_state, OPTIMIZER: optim_state}, checkpoint_id=str(tmp))
    checksums = _checksums(tmp)  # dcp.save has returned: every rank's shards and .metadata are written
    if _rank() == 0:
        (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=1, sort_keys=True) + "\n")
        torch.save(extra_state, tmp / EXTRA)
        _fsync_tree(tmp)
        _publish(tmp, folder)
    _barrier()


def verify_folder(folder: Path, checksums: bool = True) -> None:
    """Refuse, in one line naming the file, a folder that is not a whole sharded checkpoint: a file of
    the layout missing, `.metadata` that DCP cannot read, a shard it names missing or shorter than the
    bytes it places there, and (checksums) any file whose CRC-32 differs from the one saved."""
    what = f"{folder} is not a complete sharded checkpoint"
    for name in (METADATA, EXTRA, CHECKSUMS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{what}: {name} is missing (a save cut short, or not a checkpoint folder); "
                                  f"use an earlier checkpoint")
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
        storage = dcp.FileSystemReader(str(folder)).read_metadata().storage_data
        ends: dict[str, int] = {}
        for item in storage.values():
            ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    except Exception as e:  # unpickling foreign bytes, JSON garbage, a metadata without storage
        raise CheckpointError(f"{what}: its {METADATA} or {CHECKSUMS} is unreadable ({type(e).__name__}); use an "
                              f"earlier checkpoint") from None
    for name, end in sorted(ends.items()):
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(f"{what}: shard {name}, named by its {METADATA}, is missing; use an earlier checkpoint")
        if shard.stat().st_size < end:
            raise CheckpointError(f"{what}: shard {name} is cut short ({shard.stat().st_size:,} of {end:,} bytes); "
                                  f"use an earlier checkpoint")
    if not isinstance(sums, dict) or (set(ends) | {METADATA}) - set(sums):
        raise CheckpointError(f"{what}: its {CHECKSUMS} does not list every shard; use an earlier checkpoint")
    for name, crc in sorted(sums.items()) if checksums else ():
        if not (folder / name).is_file() or crc32(folder / name) != crc:
            raise CheckpointError(f"{folder / name} is damaged: it fails its CRC-32 check (the bytes changed after "
                                  f"the save: a bad disk, memory or copy); use an earlier checkpoint")
    if checksums:
        verify_crc(folder / EXTRA)


def read_extra(folder: str | Path, verify: bool = True) -> dict:
    """The non-tensor state of a whole folder (config, counters, RNG), on the CPU; `verify` checks every
    shard's size and checksum first."""
    folder = Path(folder)
    verify_folder(folder, checksums=verify)
    try:
        extra = torch.load(folder / EXTRA, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{folder / EXTRA} is not readable: {str(e).splitlines()[0][:120]}") from None
    check_state(extra, folder / EXTRA, required=(CONFIG, FORMAT))
    return extra


def check_model_shapes(folder: str | Path, weights: dict[str, torch.Tensor]) -> None:
    """Refuse in one line a folder whose saved weights differ in names or shapes from `weights` (the model its
    extra.pt describes, or the one it is loaded into): DCP would fail deep inside with a traceback as its message.
    A sharded model's tensors are DTensors, whose shape is the whole tensor's."""
    try:
        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"{folder}: its {METADATA} is unreadable ({type(e).__name__}); use another checkpoint") \
            from None
    prefix = f"{MODEL}."
    shapes = {k[len(prefix):]: getattr(v, "size", ()) for k, v in saved.items() if k.startswith(prefix)}
    check_shapes({k: v.shape for k, v in weights.items()}, shapes, str(folder))


def load_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: load model and optimizer state in place, resharded to this world size; returns extra."""
    extra = read_extra(folder, verify=False)  # verified when chosen (Checkpointer.load)
    model_state, optim_state = get_state_dict(model, optimizer)
    check_model_shapes(folder, model_state)
    state = {MODEL: model_state, OPTIMIZER: optim_state}
    dcp.load(state, checkpoint_id=str(folder))  # the caller has checked the model config matches
    set_state_dict(model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIMIZER])
    return extra


def load_sharded_weights(folder: str | Path, model: nn.Module) -> None:
    """Collective: a folder's weights alone into model (plain or FSDP-sharded), resharded to this world size:
    each rank reads only its part. The caller has checked the model config matches."""
    weights = get_model_state_dict(model)
    check_model_shapes(folder, weights)
    dcp.load({MODEL: weights}, checkpoint_id=str(folder))
    set_model_state_dict(model, weights)


def remove_stale_temporaries(checkpoint_dir: str | Path) -> None:
    """Folders left by a process killed mid-save; never a complete checkpoint."""
    for tmp in [*Path(checkpoint_dir).glob(".*.partial"), *Path(checkpoint_dir).glob(".*.old")]:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def full_model_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full unsharded weights, extra state) of a folder; call it outside any process group."""
    from models.config_loader import config_from_dict
    from models.transformer import GPT

    extra = read_extra(folder)
    weights = GPT(config_from_dict(extra[CONFIG]).model).state_dict()  # the keys and shapes to read
    check_model_shapes(folder, weights)
    try:
        with warnings.catch_warnings():  # one process without a process group is the intent here
            warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
            dcp.load({MODEL: weights}, checkpoint_id=str(folder))
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's failure in its own (a BaseException)
        raise CheckpointError(f"{folder} could not be read as its config's model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return weights, extra


"""Sharded checkpoints (torch.distributed.checkpoint, DCP): one folder per save, written by every
rank in parallel, loadable on any number of ranks (DCP reshards on load).

A folder holds DCP's shard files (`__R_0.distcp`, ...) with its `.metadata`, plus `extra.pt` (the
small non-tensor state: trainer counters, scheduler, scaler, RNG, config). Every rank writes into a
hidden temporary folder; rank 0 renames it into place only after DCP has written `.metadata` (the
last file, once every rank's shards are written) and extra.pt is fsynced. So a crash at any moment
leaves either the complete folder or none: a half-written one is never taken as valid.

Plain functions; the caller decides the folder names and when to save. The model may be FSDP2
sharded, DDP-wrapped's inner module, or plain; without a process group DCP runs in one process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from utils.checkpoint.format import CONFIG, MODEL, OPTIMIZER, CheckpointError, save_checkpoint

EXTRA = "extra.pt"
METADATA = ".metadata"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    if _rank() == 0:  # dcp.save returned on rank 0: every rank's shards and .metadata are written
        torch.save(extra_state, tmp / EXTRA)
        _fsync_tree(tmp)
        _publish(tmp, folder)
    _barrier()


def is_complete(folder: str | Path) -> bool:
    """A published folder: DCP's metadata and the extra state are both there."""
    folder = Path(folder)
    return not folder.name.startswith(".") and (folder / METADATA).is_file() and (folder / EXTRA).is_file()


def read_extra(folder: str | Path) -> dict:
    """The non-tensor state of a complete folder (config, counters, RNG), on the CPU."""
    folder = Path(folder)
    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete sharded checkpoint (no {METADATA} or {EXTRA}); "
                              f"a save was cut short: resume from an earlier folder")
    try:
        return torch.load(folder / EXTRA, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{folder / EXTRA} is not readable: {str(e).splitlines()[0][:120]}") from None


def load_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: load model and optimizer state in place, resharded to this world size; returns extra."""
    extra = read_extra(folder)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {MODEL: model_state, OPTIMIZER: optim_state}
    dcp.load(state, checkpoint_id=str(folder))  # the caller has checked the model config matches
    set_state_dict(model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIMIZER])
    return extra


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
    dcp.load({MODEL: weights}, checkpoint_id=str(folder))  # no process group: one process
    return weights, extra


def convert(folder: str | Path, out_file: str | Path) -> None:
    """Write the single-file format (weights, config, counters; no optimizer state) atomically.

    The result loads in inference.py, scripts/evaluate.py and scripts/export_hf.py; it cannot
    resume training (the optimizer stays in the folder, which --resume takes directly).
    """
    weights, extra = full_model_state(folder)
    save_checkpoint({**extra, MODEL: weights}, out_file)

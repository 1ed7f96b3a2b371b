"""The checks a start makes before it writes anything: the ranks agree, a resumed checkpoint fits the
model, the training state fits in memory, the output folders can be written (utils/train/run.py calls
them in that order)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable, TypeVar

from models.config import Config
from models.config_checks import ConfigError
from models.config_loader import config_to_dict
from utils.checkpoint import format as ckpt
from utils.checkpoint.format import CheckpointError
from utils.device import free_memory
from utils.distributed.process_group import DistInfo, gather_object
from utils.errors import UserError


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


T = TypeVar("T")

NODE_LOCAL = {"data.dir", "checkpoint.dir", "logging.dir"}


def on_every_rank(info: DistInfo, checks: Callable[[], T]) -> T:
    """Run this rank's own checks (its data, its memory, its files), then hear every rank's verdict: if
    any rank refused, every rank raises, naming it, so no rank goes on to write while another stops."""
    try:
        result, refusal = checks(), None
    except UserError as e:
        result, refusal = None, str(e)
    refusals = [(rank, why) for rank, why in enumerate(gather_object(refusal, info)) if why]
    if refusals:
        rank, why = refusals[0]
        raise UserError(why if rank == info.rank or info.world_size == 1 else f"rank {rank} refused the start: {why}")
    return result  # type: ignore[return-value]


def check_ranks_agree(cfg: Config, info: DistInfo) -> None:
    """Every rank must train the same config on the same data; a mismatch stops all of them at once
    (the first collective of the run, so nothing can hang on a rank that cadences differently)."""
    if info.world_size == 1:
        return
    manifest = Path(cfg.data.dir) / "manifest.json"
    # folders may differ (node-local disks; only rank 0 writes); the data must not, so its manifest counts
    mine = {**{k: v for k, v in _flat(config_to_dict(cfg)).items() if k not in NODE_LOCAL},
            "data manifest sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None}
    everyone = gather_object(mine, info)
    diffs = [f"{k} (rank 0: {everyone[0].get(k)!r}, rank {r}: {other.get(k)!r})"
             for r, other in enumerate(everyone) for k in sorted(set(other) | set(everyone[0]))
             if other.get(k) != everyone[0].get(k)]
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ConfigError(f"the ranks disagree on {shown}; start every rank with the same config, overrides and data")


def model_changes(cfg: Config, state: dict, free: tuple[str, ...] = ()) -> list[str]:
    """Each model setting of cfg that differs from the checkpoint's, but those in free."""
    saved, ours = state[ckpt.CONFIG].get("model", {}), config_to_dict(cfg)["model"]
    return [f"model.{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in ours.items()
            if k not in free and saved.get(k) != v]


def check_fits(cfg: Config, path: str, state: dict) -> None:
    """A checkpoint can only continue a run of the same model shape, and of the same optimizer parameter groups
    (optim.name and whether optim.base_width is set), whose state it holds."""
    diff = model_changes(cfg, state)
    if diff:
        raise CheckpointError(f"{path} was trained with another model shape ({'; '.join(diff)}); "
                              f"resume with the same model settings")
    saved, ours = state[ckpt.CONFIG].get("optim", {}), config_to_dict(cfg)["optim"]
    if (saved.get("name", "adamw"), bool(saved.get("base_width"))) != (ours["name"], bool(ours["base_width"])):
        raise CheckpointError(f"{path} was trained with optim.name={saved.get('name', 'adamw')} optim.base_width="
                              f"{saved.get('base_width', 0)}, whose optimizer state this run's cannot take; resume with "
                              f"those, or start from its weights with train.init_from={path}")


def state_bytes_per_rank(cfg: Config, world_size: int) -> tuple[int, int]:
    """(parameters, bytes of weights, gradients and AdamW state one rank holds: 16 per parameter, over the
    world size under FSDP). The count is from the shapes alone (a lower bound: the matrices of the blocks,
    the embeddings and positions), so it is instant even for absurd sizes."""
    m = cfg.model
    mlp = (3 if m.activation == "swiglu" else 2) * m.dim * m.ffn_dim
    n = m.n_layers * (4 * m.dim * m.dim + mlp) + (m.vocab_size + m.context_length) * m.dim
    shards = world_size if cfg.distributed.sharded else 1
    return n, math.ceil(16 * n / shards)


def check_memory(cfg: Config, info: DistInfo) -> None:
    """Refuse a model whose training state cannot fit in this rank's free device memory, before anything
    is allocated."""
    n, need = state_bytes_per_rank(cfg, info.world_size)
    free = free_memory(info.device)
    if need > free:
        fsdp = cfg.distributed.sharded
        hint = ", or shard them with distributed.strategy=fsdp" if info.world_size > 1 and not fsdp else ""
        raise ConfigError(f"the model has at least {n:,} parameters, whose weights, gradients and optimizer state"
                          f"{f', sharded over {info.world_size} ranks,' if fsdp else ''} need ~{need / 2**30:.1f} GiB "
                          f"per rank, more than the {free / 2**30:.1f} GiB free on {info.device}; lower model.dim, "
                          f"model.n_layers, model.ffn_dim or model.context_length{hint}")


def check_writable(path: Path, key: str) -> None:
    """The folder, or the nearest existing folder above it, must be writable; probes without writing."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path} cannot be written ({existing} is not a writable folder); "
                        f"choose another with {key}=DIR")

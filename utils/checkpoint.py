"""Checkpoint files: atomic saves, validated loads, auto-resume, keep-last-K, RNG capture.

Layout of <checkpoint_dir>: step_NNNNNNN.pt (the last keep_last kept), last_checkpoint.pt (a
hard link to the newest step file), best_model.pt (lowest validation loss so far), config.yaml.
A file is replaced only by os.replace of a complete, fsynced temporary, so a crash or a full disk
during a save leaves every earlier file as it was.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models.config import UserError

FORMAT_VERSION = 2  # 2: the window order became a keyed bijection (data/order.py)
# stable top-level keys of a checkpoint
MODEL, OPTIMIZER, SCHEDULER, SCALER, TRAINER, RNG, CONFIG, FORMAT = (
    "model", "optimizer", "scheduler", "scaler", "trainer", "rng", "config", "format_version")
REQUIRED = (MODEL, CONFIG, FORMAT)
STEP_FILE = re.compile(r"step_(\d{7,})\.pt")


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def step_path(checkpoint_dir: str | Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"step_{step:07d}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write state to path atomically: temporary file, flush, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def link_latest(src: Path, link: Path) -> None:
    """Point `link` at src atomically (hard link, or a copy where links are unsupported)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, link)


def load_checkpoint(path: str | Path) -> dict:
    """Load and validate a checkpoint onto the CPU (callers copy tensors to their own device)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, wrong file type...
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0][:120]}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"{path} is not a checkpoint of this project (no {'/'.join(REQUIRED)} entries)")
    if state[FORMAT] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state[FORMAT]}, this code reads {FORMAT_VERSION}")
    return state


def latest_valid(checkpoint_dir: str | Path, warn=print) -> tuple[Path, dict] | None:
    """The newest step checkpoint that loads and validates; broken ones are reported and skipped."""
    d = Path(checkpoint_dir)
    candidates = sorted((p for p in d.glob("step_*.pt") if STEP_FILE.fullmatch(p.name)), reverse=True) \
        if d.is_dir() else []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            warn(f"warning: skipping {e}")
    return None


def prune(checkpoint_dir: str | Path, keep_last: int) -> None:
    steps = sorted(p for p in Path(checkpoint_dir).glob("step_*.pt") if STEP_FILE.fullmatch(p.name))
    for old in steps[:-keep_last]:
        old.unlink()


def remove_stale_temporaries(checkpoint_dir: str | Path) -> None:
    """Temporaries left by a process killed mid-save; never a complete checkpoint."""
    for tmp in Path(checkpoint_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a readable list of every key whose presence or shape differs."""
    own = model.state_dict()
    problems = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
                for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    problems += [f"{k}: missing from checkpoint" for k in own if k not in weights]
    problems += [f"{k}: not in model" for k in weights if k not in own]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"{source} holds a different model shape: {shown}")
    model.load_state_dict(weights)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from; NumPy's array is stored as a tensor for weights_only loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

"""The checkpoint file format: atomic saves, validated loads, the model a checkpoint describes, RNG
capture. A file is only ever replaced by os.replace of a complete, fsynced temporary, so a crash, a
kill or a full disk during a save leaves every earlier file as it was. The folder a run keeps its
checkpoints in is owned by utils/checkpoint/folder.py.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
import torch.nn as nn

from models.config_loader import SECTIONS, config_from_dict
from models.transformer import GPT
from utils.errors import UserError

FORMAT_VERSION = 2  # 2: the window order became a keyed bijection (data/order.py)
# stable top-level keys of a checkpoint
MODEL, OPTIMIZER, SCHEDULER, SCALER, TRAINER, RNG, CONFIG, FORMAT = (
    "model", "optimizer", "scheduler", "scaler", "trainer", "rng", "config", "format_version")
REQUIRED = (MODEL, CONFIG, FORMAT)


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, does not fit the model, or could not be written."""


# -- files ---------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_mode() -> int:
    """0666 less the umask: what open() would give (mkstemp alone gives 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_failure(path: Path, e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    # torch.save reports a failed write as RuntimeError ("file write failed"): find out why
    try:
        if shutil.disk_usage(path.parent).free < 1 << 20:
            return "no space left on device"
    except OSError:
        pass
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


RESUME_ADVICE = "Free space or fix the folder, then continue with --resume auto"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], advice: str = RESUME_ADVICE) -> None:
    """Write a file atomically: temporary in the same folder, flush, fsync, rename.

    Any failure leaves the previous file (if any) untouched and raises CheckpointError ending in `advice`
    (a training run's by default).
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"could not write {path}: {_write_failure(path, e)}; every file already in "
                              f"{path.parent} is intact. {advice}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(state: dict, path: str | Path, advice: str = RESUME_ADVICE) -> None:
    atomic_write(path, lambda f: torch.save(state, f), advice)


def verify_crc(path: Path) -> None:
    """torch.save writes a zip whose every entry carries the CRC-32 of its bytes, which torch.load never
    checks: read every entry against it, so a flipped bit is refused (about 0.2 s per GB, docs/benchmarks.md)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {str(e)[:120]}") from None
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: its entry {bad} fails its CRC-32 check (the bytes changed after "
                              f"the save: a bad disk, memory or copy); use another checkpoint")


def check_state(state: object, source: Path, required: tuple[str, ...] = REQUIRED) -> None:
    """A checkpoint of this project in this format, whose config has every section (a partial config would
    silently take defaults for the rest, a model of another shape)."""
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise CheckpointError(f"{source} is not a checkpoint of this project (no {'/'.join(required)} entries)")
    if state[FORMAT] != FORMAT_VERSION:
        raise CheckpointError(f"{source} has checkpoint format {state[FORMAT]!r:.20}, this code reads "
                              f"{FORMAT_VERSION}; use the version of this repository that wrote it")
    config = state[CONFIG]
    missing = [s for s in SECTIONS if not isinstance(config, dict) or not isinstance(config.get(s), dict)]
    if missing:
        raise CheckpointError(f"{source} is not a checkpoint of this project: its config lacks the sections "
                              f"{', '.join(missing)}")
    try:
        config_from_dict(config)
    except UserError as e:
        raise CheckpointError(f"{source} holds a config this code refuses: {e}") from None


def load_checkpoint(path: str | Path, mmap: bool = False, verify: bool = True) -> dict:
    """Load and validate a checkpoint onto the CPU (callers copy tensors to their own device); `verify`
    checks every byte against its CRC-32 first."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" + (" (a folder that is not a sharded checkpoint)"
                                                                 if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a save that was cut short, or a failed copy")
    if verify:
        verify_crc(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, pickle garbage, wrong file type, unreadable...
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    check_state(state, path)
    return state


def check_shapes(own: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse in one line weights whose names or shapes differ from the model's, listing each difference."""
    problems = [f"{k}: checkpoint {tuple(saved[k])} vs model {tuple(v)}"
                for k, v in own.items() if k in saved and tuple(saved[k]) != tuple(v)]
    problems += [f"{k}: missing from checkpoint" for k in own if k not in saved]
    problems += [f"{k}: not in model" for k in saved if k not in own]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"{source} holds a different model shape: {shown}")


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a readable list of every key whose presence or shape differs."""
    check_shapes({k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in weights.items()}, source)
    model.load_state_dict(weights)


def build_model(state: dict, source: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> GPT:
    """The model a loaded checkpoint describes, holding its weights, in eval mode."""
    model = GPT(config_from_dict(state[CONFIG]).model)
    load_model_weights(model, state[MODEL], str(source))
    # the parameters only: Module.to(dtype) casts buffers too, and the RoPE tables stay fp32 as in training
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.to(device).eval()


# -- RNG -----------------------------------------------------------------------------------------
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

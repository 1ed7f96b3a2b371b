"""Checkpoints: the file format (atomic saves, validated loads, RNG capture) and the `Checkpointer`,
the one owner of the checkpoint folder.

Layout of the folder (checkpoint.dir):
    step_NNNNNNN.pt     every checkpoint.every steps and at the end; the newest keep_last are kept
    last_checkpoint.pt  a hard link to the newest step file
    best_model.pt       the lowest validation loss so far
    config.yaml         the resolved config of the run
A file is only ever replaced by os.replace of a complete, fsynced temporary, so a crash, a kill or
a full disk during a save leaves every earlier file as it was. Pruning removes only step files
older than the one just written and verified, so a stray or corrupt file can never cost the
newest loadable checkpoint. Nothing is written before the run is accepted (`accept`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
import torch.nn as nn

from models.config_loader import config_from_dict
from models.transformer import GPT
from utils.distributed import DistInfo, broadcast_object
from utils.errors import UserError

FORMAT_VERSION = 2  # 2: the window order became a keyed bijection (data/order.py)
# stable top-level keys of a checkpoint
MODEL, OPTIMIZER, SCHEDULER, SCALER, TRAINER, RNG, CONFIG, FORMAT = (
    "model", "optimizer", "scheduler", "scaler", "trainer", "rng", "config", "format_version")
REQUIRED = (MODEL, CONFIG, FORMAT)
STEP_FILE = re.compile(r"step_(\d{7,})\.pt")
STEP_DIR = re.compile(r"step_(\d{7,})")
LAST, BEST, BEST_DIR, CONFIG_FILE = "last_checkpoint.pt", "best_model.pt", "best_model", "config.yaml"


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


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: temporary in the same folder, flush, fsync, rename.

    Any failure leaves the previous file (if any) untouched and raises CheckpointError.
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
                              f"{path.parent} is intact. Free space or fix the folder, then continue with "
                              f"--resume auto") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(state: dict, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load and validate a checkpoint onto the CPU (callers copy tensors to their own device)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a save that was cut short, or a failed copy")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, pickle garbage, wrong file type, unreadable...
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"{path} is not a checkpoint of this project (no {'/'.join(REQUIRED)} entries)")
    if state[FORMAT] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state[FORMAT]}, this code reads {FORMAT_VERSION}; "
                              f"use the version of this repository that wrote it")
    return state


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


def build_model(state: dict, source: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> GPT:
    """The model a loaded checkpoint describes, holding its weights, in eval mode."""
    model = GPT(config_from_dict(state[CONFIG]).model)
    load_model_weights(model, state[MODEL], str(source))
    return model.to(device=device, dtype=dtype).eval()


def load_model(path: str | Path, device: torch.device) -> GPT:
    """Any checkpoint written by training (single process, DDP or compiled), in fp32, for inference."""
    return build_model(load_checkpoint(path), path, device)


# -- the folder ----------------------------------------------------------------------------------
class Checkpointer:
    """Owns one checkpoint folder: decides fresh start, resume or refusal, saves, and prunes.

    Collective methods (`save`, `save_best`) are called by every rank; rank 0 writes and a write
    failure is raised on every rank, so no rank waits for a file that will never come.
    """

    def __init__(self, directory: str | Path, keep_last: int, info: DistInfo, sharded: bool = False) -> None:
        self.dir, self.keep_last, self.info = Path(directory), keep_last, info
        self.sharded = sharded  # FSDP: one DCP folder per save (utils/sharded_checkpoint.py), written by every rank

    def step_files(self) -> list[tuple[int, Path]]:
        """(step, path) of every step_NNNNNNN.pt (or, sharded, every step_NNNNNNN/ folder), oldest first."""
        if not self.dir.is_dir():
            return []
        pattern = STEP_DIR if self.sharded else STEP_FILE
        found = ((pattern.fullmatch(p.name), p) for p in self.dir.iterdir())
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def run_files(self) -> list[Path]:
        """Every file of the layout present: any of them means a run lives here."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir()
                      if p.name in (LAST, BEST, BEST_DIR, CONFIG_FILE) or p.name.startswith("step_"))

    def _refuse(self, why: str, files: list[Path]) -> CheckpointError:
        names = ", ".join(p.name for p in files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        return CheckpointError(f"{self.dir} {why} ({names}); nothing was changed")

    def find_resume(self, resume: str | None, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
        """What this start continues from: None for a fresh start; raises to refuse. Rank 0 only."""
        present = self.run_files()
        if resume is None:
            if present:
                raise self._refuse("already holds a run; continue it with --resume auto, or start a new run "
                                   "with checkpoint.dir=NEW_DIR", present)
            return None
        if resume == "auto":
            found = self._newest_loadable(warn)
            if found:
                return found
            leftovers = [p for p in present if p.name != CONFIG_FILE]
            if leftovers:  # a fresh start would overwrite them
                raise self._refuse("holds no loadable checkpoint to resume, but holds files a fresh start would "
                                   "overwrite; move them away or use checkpoint.dir=NEW_DIR", leftovers)
            return None
        path = Path(resume)
        state = self.load(path)
        step = state.get(TRAINER, {}).get("step", 0)
        if path.resolve().parent != self.dir.resolve():
            if present:
                raise self._refuse(f"holds another run, which resuming {path} there would overwrite; use "
                                   f"checkpoint.dir=NEW_DIR", present)
        else:
            newer = [p for s, p in self.step_files() if s > step]
            if newer:
                raise self._refuse(f"holds checkpoints newer than {path.name} (step {step}) that resuming it would "
                                   f"overwrite; use --resume auto, or copy the file to a new checkpoint.dir", newer)
        return path, state

    def _newest_loadable(self, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
        """The loadable checkpoint of the highest step: a step file, or last_checkpoint.pt when it
        is newer than every loadable step file (its step file lost)."""
        last = None
        if not self.sharded and (self.dir / LAST).is_file():
            try:
                last = self.dir / LAST, load_checkpoint(self.dir / LAST)
            except CheckpointError as e:
                warn(f"warning: skipping {e}")
        last_step = last[1].get(TRAINER, {}).get("step", 0) if last else -1
        for step, path in reversed(self.step_files()):
            if step < last_step:
                break
            try:
                return path, self.load(path)
            except CheckpointError as e:
                warn(f"warning: skipping {e}")
        return last

    def load(self, path: Path) -> dict:
        """A checkpoint's state; for a sharded folder, everything but the tensors (restore() loads those)."""
        if path.is_dir():
            from utils import sharded_checkpoint  # imports this module's format constants

            if not sharded_checkpoint.is_complete(path):
                raise CheckpointError(f"{path} is not a complete sharded checkpoint (no .metadata or extra.pt)")
            return sharded_checkpoint.read_extra(path)
        return load_checkpoint(path)

    def restore(self, path: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Collective for a sharded folder: weights and optimizer state into a (possibly sharded) model."""
        if path.is_dir():
            from utils import sharded_checkpoint

            sharded_checkpoint.load_sharded(path, model, optimizer)
            return
        if OPTIMIZER not in state:
            raise CheckpointError(f"{path} holds weights only and cannot resume training")
        load_model_weights(model, state[MODEL], str(path))
        optimizer.load_state_dict(state[OPTIMIZER])

    def accept(self, config_yaml: str) -> None:
        """The run passed every check: create the folder, clear dead temporaries, record the config."""
        if self.info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for tmp in self.dir.glob(".*.tmp"):  # left by a process killed mid-save; never complete
                tmp.unlink(missing_ok=True)
            if self.sharded:  # only sharded saves leave folders (and importing DCP costs ~1.5 s)
                from utils import sharded_checkpoint

                sharded_checkpoint.remove_stale_temporaries(self.dir)
            atomic_write(self.dir / CONFIG_FILE, lambda f: f.write(config_yaml.encode()))

    def _collective(self, write: Callable[[], Path]) -> Path:
        error = path = None
        if self.info.is_main:
            try:
                path = write()
            except CheckpointError as e:
                error = str(e)
        error = broadcast_object(error, self.info)  # also the barrier: nobody leaves before the file is whole
        if error:
            raise CheckpointError(error)
        return path or self.dir

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict, step: int) -> Path:
        """Collective: write step N, verify it, point last_checkpoint.pt at it, prune older ones."""
        if self.sharded:
            return self._save_sharded(self.dir / f"step_{step:07d}", model, optimizer, extra, step)
        state = {MODEL: model.state_dict(), OPTIMIZER: optimizer.state_dict(), **extra}
        return self._collective(lambda: self._save_step(state, step))

    def save_best(self, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> Path:
        """Collective: replace best_model.pt (sharded: best_model/)."""
        if self.sharded:
            return self._save_sharded(self.dir / BEST_DIR, model, optimizer, extra, None)
        state = {MODEL: model.state_dict(), OPTIMIZER: optimizer.state_dict(), **extra}

        def write() -> Path:
            save_checkpoint(state, self.dir / BEST)
            return self.dir / BEST
        return self._collective(write)

    def _save_sharded(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
                      step: int | None) -> Path:
        from utils import sharded_checkpoint

        sharded_checkpoint.save_sharded(folder, model, optimizer, extra)  # published whole, or not at all
        if step is not None:
            self._collective(lambda: self._prune(step))
        return folder

    def _prune(self, step: int) -> Path:
        """Remove step checkpoints older than `step` (just written and verified) beyond keep_last."""
        older = [p for s, p in self.step_files() if s < step]
        for old in older[: max(0, len(older) - (self.keep_last - 1))]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        return self.dir

    def _save_step(self, state: dict, step: int) -> Path:
        path = self.dir / f"step_{step:07d}.pt"
        save_checkpoint(state, path)
        load_checkpoint(path, mmap=True)  # verified before anything older may go
        self._link_last(path)
        self._prune(step)
        return path

    def _link_last(self, src: Path) -> None:
        """Point last_checkpoint.pt at src atomically (a hard link, or a copy where links fail)."""
        link = self.dir / LAST
        tmp = link.with_name(f".{LAST}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, link)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"could not update {link}: {e.strerror}; {src} itself is complete") from None


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

"""The `Checkpointer`, the one owner of a run's checkpoint folder: fresh start, resume or refusal,
saves, pruning.

Layout of the folder (checkpoint.dir):
    step_NNNNNNN.pt     every checkpoint.every steps and at the end; the newest keep_last are kept
    last_checkpoint.pt  a hard link to the newest step file
    best_model.pt       the lowest validation loss so far
    config.yaml         the resolved config of the run
    .writer.lock        while a run writes here: its claim on the folder (utils/folder_lock.py)
(FSDP: step_NNNNNNN/ and best_model/ folders instead, utils/checkpoint/sharded.py.) Every file is
written atomically (utils/checkpoint/format.py). Pruning removes only step files older than the one just
written and verified, so a stray or corrupt file can never cost the newest loadable checkpoint.
Rank 0 claims the folder (`claim`, utils/folder_lock.py) before it looks at what the folder holds, and keeps
it until `release`: two runs started into one folder at once cannot both pass "already holds a run" and mix
their files. Apart from that claim, nothing is written before the run is accepted (`accept`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from utils.checkpoint.format import (MODEL, OPTIMIZER, TRAINER, CheckpointError, atomic_write, load_checkpoint,
                              load_model_weights, save_checkpoint)
from utils.checkpoint.reader import read_state
from utils.distributed.process_group import DistInfo, broadcast_object
from utils.folder_lock import FolderBusy, FolderLock

STEP_FILE = re.compile(r"step_(\d{7,})\.pt")
STEP_DIR = re.compile(r"step_(\d{7,})")
LAST, BEST, BEST_DIR, CONFIG_FILE = "last_checkpoint.pt", "best_model.pt", "best_model", "config.yaml"


class Checkpointer:
    """Owns one checkpoint folder: decides fresh start, resume or refusal, saves, and prunes.

    Collective methods (`save`, `save_best`) are called by every rank; rank 0 writes and a write
    failure is raised on every rank, so no rank waits for a file that will never come.
    """

    def __init__(self, directory: str | Path, keep_last: int, info: DistInfo, sharded: bool = False,
                 verify: bool = True) -> None:
        self.dir, self.keep_last, self.info = Path(directory), keep_last, info
        self.verify = verify  # checksums at load: every byte read once more (~0.2 s per GB, docs/benchmarks.md)
        self.sharded = sharded  # FSDP: one DCP folder per save (utils/checkpoint/sharded.py), written by every rank
        self.lock: FolderLock | None = None  # rank 0's claim on the folder, from claim until release

    def step_path(self, step: int) -> Path:
        """Where step N is saved: step_NNNNNNN.pt, or the folder step_NNNNNNN/ when sharded."""
        return self.dir / (f"step_{step:07d}" + ("" if self.sharded else ".pt"))

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

    def claim(self) -> None:
        """Collective, before find_resume: rank 0 claims the folder for this run until `release` (creating it),
        so a second run started into it at once is refused on every rank instead of mixing its files in."""
        error = None
        if self.info.is_main and self.lock is None:
            try:
                self.lock = FolderLock(self.dir, "a training run").acquire()
            except FolderBusy as e:
                error = str(e)
            except OSError as e:
                error = f"checkpoint.dir={self.dir} cannot be written ({e.strerror}); choose another folder"
        error = broadcast_object(error, self.info)
        if error:
            raise CheckpointError(error)

    def release(self) -> None:
        """Give the folder back, and remove it if claim made it and nothing was written: at the end of the run
        and on every path out of it. Idempotent; a no-op on ranks other than 0."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def find_resume(self, resume: str | None, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
        """What this start continues from: None for a fresh start; raises to refuse. Rank 0 only, after claim."""
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
        if self.sharded and path.is_file():
            raise CheckpointError(f"{path} is a single-file checkpoint (one process or DDP), and distributed."
                                  f"strategy=fsdp resumes sharded folders; resume it with distributed.strategy=ddp")
        # rank 0 decides what to resume; the bytes are the same for all
        return read_state(path, verify=self.verify and self.info.is_main)

    def restore(self, path: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Collective for a sharded folder: weights and optimizer state into a (possibly sharded) model."""
        if path.is_dir():
            from utils.checkpoint import sharded as sharded_checkpoint

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
        if self.lock:  # rank 0's claim rules out a live writer: any temporary is a dead one's
            for tmp in self.dir.glob(".*.tmp"):  # left by a process killed mid-save; never complete
                tmp.unlink(missing_ok=True)
            if self.sharded:  # only sharded saves leave folders (and importing DCP costs ~1.5 s)
                from utils.checkpoint import sharded as sharded_checkpoint

                sharded_checkpoint.remove_stale_temporaries(self.dir)
        if self.info.is_main:  # the run's resolved config, once (a back-off's micro-batch is trainer state)
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
            return self._save_sharded(self.step_path(step), model, optimizer, extra, step)
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
        from utils.checkpoint import sharded as sharded_checkpoint

        sharded_checkpoint.save_sharded(folder, model, optimizer, extra)  # published whole, or not at all
        if step is not None:
            self._collective(lambda: self._prune(step))
        return folder

    def _prune(self, step: int) -> Path:
        """Remove step checkpoints older than `step` (just written and verified) beyond keep_last."""
        older = [p for s, p in self.step_files() if s < step]
        for old in older[: max(0, len(older) - (self.keep_last - 1))]:
            try:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            except OSError as e:
                raise CheckpointError(f"could not remove the old checkpoint {old}: {e.strerror}; the newer ones "
                                      f"are complete") from None
        return self.dir

    def _save_step(self, state: dict, step: int) -> Path:
        path = self.step_path(step)
        save_checkpoint(state, path)
        load_checkpoint(path, mmap=True)  # verified before anything older may go
        self._link_last(path)
        self._prune(step)
        return path

    def _link_last(self, src: Path) -> None:
        """Point last_checkpoint.pt at src atomically (a hard link, or a copy where links fail)."""
        link = self.dir / LAST
        tmp = link.with_name(f".{LAST}.{os.getpid()}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, link)
        except OSError as e:
            with contextlib.suppress(OSError):  # the folder may have turned read-only: then the error says so
                tmp.unlink(missing_ok=True)
            raise CheckpointError(f"could not update {link}: {e.strerror}; {src} itself is complete") from None

"""Training-time data: memory-mapped byte splits and a deterministic per-rank batch plan.

An epoch is a shuffled pass over non-overlapping windows of context_length + 1 bytes, the
windows shifted by a random phase each epoch so boundaries differ between epochs. Both the
phase and the order come from (seed, epoch) alone, and every optimizer step takes the next
global batch of windows, so which bytes a rank sees at (step, micro_step) is a pure function:
resuming needs only the step, and any world size sees the same global batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.config import UserError
from utils.device import pin_memory


class DataError(UserError):
    """The dataset is missing or cannot serve the requested batches."""


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"dataset not prepared: {path} is missing; run "
                        f"`python data/prepare_dataset.py --out {data_dir}` (add --input FILES for your own text)")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; re-run data/prepare_dataset.py on a non-empty corpus")
    return np.memmap(path, dtype=np.uint8, mode="r")


def to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) uint8 windows -> int64 inputs and targets (B, T) on device.

    Bytes travel as uint8 (8x less than int64) from pinned memory, asynchronously on CUDA.
    """
    t = torch.from_numpy(windows)
    if pin_memory(device):
        t = t.pin_memory().to(device, non_blocking=True)
    t = t.to(device).long()  # a no-op on CPU and after the CUDA copy; MPS copies here
    return t[:, :-1], t[:, 1:]


class BatchPlan:
    """Which windows each rank trains on at each (step, micro_step)."""

    def __init__(self, data: np.ndarray, context_length: int, batch_size: int, grad_accum_steps: int,
                 rank: int, world_size: int, seed: int) -> None:
        self.data, self.T = data, context_length
        self.batch_size, self.accum, self.rank, self.world = batch_size, grad_accum_steps, rank, world_size
        self.seed = seed
        if len(data) < context_length + 1:
            raise DataError(f"model.context_length={context_length} is longer than the training split "
                            f"({len(data):,} bytes); lower it or prepare more text")
        # windows start at phase + i*T with phase < T, so this many always fit
        self.n_windows = (len(data) - context_length) // context_length
        per_step = batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = self.n_windows // per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split holds {self.n_windows:,} windows of {context_length + 1} bytes, "
                            f"fewer than one global batch ({batch_size} x {grad_accum_steps} accumulation x "
                            f"{world_size} processes = {per_step}); lower train.batch_size, "
                            f"train.grad_accum_steps or model.context_length, or prepare more text")
        self._epoch: tuple[int, int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        """(phase, permutation of window indices) for an epoch; reshuffled every epoch."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            phase = int(rng.integers(self.T))
            self._epoch = (epoch, phase, rng.permutation(self.n_windows))
        return self._epoch[1], self._epoch[2]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of an optimizer step."""
        return divmod(step, self.steps_per_epoch)

    def window_starts(self, step: int, micro_step: int) -> np.ndarray:
        """Byte offsets of this rank's batch_size windows."""
        epoch, step_in_epoch = self.position(step)
        phase, order = self.epoch_order(epoch)
        global_micro = self.batch_size * self.world
        first = (step_in_epoch * self.accum + micro_step) * global_micro + self.rank * self.batch_size
        return phase + order[first:first + self.batch_size] * self.T

    def batch(self, step: int, micro_step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.window_starts(step, micro_step)
        # one vectorised gather from the memmap, no per-sample Python work
        windows = self.data[starts[:, None] + np.arange(self.T + 1)]
        return to_device(windows, device)

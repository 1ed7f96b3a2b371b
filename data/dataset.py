"""Training-time data: a split's shards as one memory-mapped byte array, and a per-rank batch plan.

An epoch is a shuffled pass over non-overlapping windows of context_length + 1 bytes, the
windows shifted by a random phase each epoch so boundaries differ between epochs. The phase and
the order are pure functions of (seed, epoch, index): the order is a keyed bijection over the
window indices (data/order.py), so nothing grows with the corpus. Every optimizer step takes the
next global batch of windows, so which bytes a rank sees at (step, micro_step) is a pure function:
resuming needs only the step, and any world size sees the same global batches.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

from data.order import KeyedPermutation, derive_key, mix64
from data.shards import DataError, check_shards, read_manifest
from utils.device import pin_memory

class ShardedBytes:
    """Read-only bytes spread over shard files, indexed as one array: len(), [a:b] (a view, nothing
    read) and integer arrays of any shape (a uint8 array of that shape).

    Each access maps the shards it needs and unmaps them after, as nanoGPT does per batch: a mapping
    kept open accumulates every page ever touched in the process's RSS (whole large folios on recent
    kernels), so memory would grow with the corpus over a long run.
    """

    def __init__(self, paths: list[Path], sizes: list[int], start: int = 0, stop: int | None = None) -> None:
        self.paths, self.sizes = paths, sizes
        self.ends = np.cumsum(sizes)
        self.start, self.stop = start, int(self.ends[-1]) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ShardedBytes slices take no step")
            return ShardedBytes(self.paths, self.sizes, self.start + start, self.start + max(start, stop))
        index = np.asarray(key)
        if index.dtype.kind not in "iu":
            raise IndexError(f"ShardedBytes takes integer indices (got {index.dtype})")
        n = len(self)
        index = np.where(index < 0, index + n, index)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"index out of range for {n:,} bytes")
        flat = index.reshape(-1).astype(np.int64) + self.start
        which = np.searchsorted(self.ends, flat, side="right")
        out = np.empty(flat.shape, dtype=np.uint8)
        for s in np.unique(which):
            mine = which == s
            with open(self.paths[s], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                shard = np.frombuffer(mapped, dtype=np.uint8)
                out[mine] = shard[flat[mine] - (self.ends[s] - self.sizes[s])]
                del shard  # releases the buffer so the mapping can close
        return out.reshape(index.shape)


def load_split(data_dir: str | Path, split: str) -> ShardedBytes:
    """A split of a prepared dataset; its shards are checked for presence and size, not read."""
    manifest = read_manifest(data_dir)
    entries = manifest["splits"].get(split)
    if not entries:
        raise DataError(f"{data_dir} has no {split} split; prepare it with --{split}-fraction or --{split}-bytes "
                        f"(python -m data.prepare_dataset --help)")
    check_shards(data_dir, manifest, [split], sha256=False)
    return ShardedBytes([Path(data_dir) / e["file"] for e in entries], [e["bytes"] for e in entries])


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

    def __init__(self, data: ShardedBytes | np.ndarray, context_length: int, batch_size: int, grad_accum_steps: int,
                 rank: int, world_size: int, seed: int) -> None:
        self.data, self.T = data, context_length
        self.batch_size, self.accum, self.rank, self.world = batch_size, grad_accum_steps, rank, world_size
        self.seed = seed
        if len(data) < context_length + 1:
            raise DataError(f"model.context_length={context_length} is longer than the training split "
                            f"({len(data):,} bytes); lower it or prepare more text")
        # windows start at phase + i*T with phase < T, so this many always fit
        self.n_windows = (len(data) - context_length) // context_length
        self.global_batch = batch_size * grad_accum_steps * world_size  # sequences per optimizer step
        self.steps_per_epoch = self.n_windows // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split holds {self.n_windows:,} windows of {context_length + 1} bytes, "
                            f"fewer than one global batch ({batch_size} x {grad_accum_steps} accumulation x "
                            f"{world_size} processes = {self.global_batch}); lower train.batch_size, "
                            f"train.grad_accum_steps or model.context_length, or prepare more text")
        self._epoch: tuple[int, int, KeyedPermutation] | None = None

    def with_micro_batch(self, batch_size: int) -> BatchPlan:
        """The same global batches and order in micro-batches of batch_size (which must divide this one's)."""
        return BatchPlan(self.data, self.T, batch_size, self.accum * self.batch_size // batch_size, self.rank,
                         self.world, self.seed)

    def epoch_order(self, epoch: int) -> tuple[int, KeyedPermutation]:
        """(phase, window order) of an epoch: order(i) is the window at position i; a new order every epoch."""
        if self._epoch is None or self._epoch[0] != epoch:
            key = derive_key(self.seed, epoch)
            self._epoch = (epoch, mix64(key) % self.T, KeyedPermutation(self.n_windows, key))
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
        return phase + order(np.arange(first, first + self.batch_size)) * self.T

    def batch(self, step: int, micro_step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.window_starts(step, micro_step)
        # one vectorised gather per shard touched, no per-sample Python work
        windows = self.data[starts[:, None] + np.arange(self.T + 1)]
        return to_device(windows, device)

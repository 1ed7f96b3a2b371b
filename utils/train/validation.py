"""Evaluation: the deterministic pass over a split (loss, perplexity, bits per byte), shared by training
and scripts/evaluate.py, and the Validator that runs it with a fixed-seed text sample during training."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.dataset import DataError
from models.config import EvalConfig
from utils.distributed.process_group import DistInfo, all_reduce_sum, unwrap, without_ddp
from utils.progress import progress
from utils.text import to_bytes



@torch.no_grad()
def evaluate(model: nn.Module, data: np.ndarray, context_length: int, batch_size: int, info: DistInfo,
             autocast: AbstractContextManager | None = None) -> dict[str, float]:
    """Mean next-byte loss over every byte of `data` after the first, each counted exactly once.

    The text is cut into consecutive windows of context_length predictions (the last one padded
    and masked); ranks take every world_size-th window and the sums are added across ranks, so
    the result does not depend on the world size or the batch size.
    """
    T, n_targets = context_length, len(data) - 1
    n_windows = math.ceil(n_targets / T)
    # DDP's forward may broadcast buffers (the RoPE tables), a collective that a rank with no
    # window to evaluate would never join; evaluation needs no gradient sync anyway
    model = without_ddp(model)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)  # (sum of losses, count)
    mine = list(range(info.rank, n_windows, info.world_size))
    # the same number of forwards on every rank: under FSDP each one is a collective (all-gather);
    # a rank out of windows runs window 0 with every target masked
    n_batches = math.ceil(math.ceil(n_windows / info.world_size) / batch_size)
    bar = progress(len(mine) * T, "evaluate", unit="B", enabled=info.is_main)  # rank 0's share stands for all
    for i in range(0, n_batches * batch_size, batch_size):
        chunk = mine[i:i + batch_size]
        starts = np.array(chunk or [0]) * T
        idx = np.minimum(starts[:, None] + np.arange(T + 1), len(data) - 1)
        windows = torch.from_numpy(data[idx].astype(np.int64)).to(info.device)
        x, y = windows[:, :-1], windows[:, 1:].clone()
        y[torch.from_numpy(starts[:, None] + np.arange(1, T + 1) > n_targets).to(info.device)] = -1
        if not chunk:
            y[:] = -1
        with autocast or nullcontext():
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                               reduction="sum")
        total += torch.stack([loss.double(), (y >= 0).sum().double()])
        bar.update(len(starts) * T)
    bar.close()
    model.train(was_training)
    loss_sum, count = all_reduce_sum(total, info).tolist()
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": loss / math.log(2),
            "bytes": int(count)}


class Validator:
    def __init__(self, model: nn.Module, val_data: np.ndarray, context_length: int, batch_size: int,
                 cfg: EvalConfig, info: DistInfo, autocast: AbstractContextManager, sharded: bool = False) -> None:
        self.model, self.raw, self.cfg, self.info, self.autocast = model, unwrap(model), cfg, info, autocast
        self.sharded = sharded
        self.data = self.check_feasible(val_data, cfg)
        self.context_length, self.batch_size = context_length, batch_size

    @staticmethod
    def check_feasible(val_data: np.ndarray, cfg: EvalConfig) -> np.ndarray:
        """The bytes each pass evaluates; refused before the first step, not after hours of training."""
        data = val_data[: cfg.max_bytes or None]
        if len(data) < 2:
            raise DataError(f"validation needs at least 2 bytes, one to predict from and one to predict, but "
                            f"{'eval.max_bytes leaves' if cfg.max_bytes else 'the validation split holds'} "
                            f"{len(data)}; prepare a larger split (--val-fraction) or raise eval.max_bytes")
        return data

    def evaluate(self) -> dict[str, float]:
        """Loss, bits per byte and perplexity over every validation byte; collective."""
        return evaluate(self.model, self.data, self.context_length, self.batch_size, self.info, self.autocast)

    def sample(self) -> str:
        """A fixed-seed sample from eval.sample_prompt; its own generator leaves training RNG untouched.

        Collective under FSDP (each forward all-gathers the weights), so every rank generates it;
        elsewhere only rank 0 does the work and the others return ""."""
        if not (self.info.is_main or self.sharded):
            return ""
        g = torch.Generator(device=self.info.device).manual_seed(0)
        prompt = torch.tensor([list(to_bytes(self.cfg.sample_prompt))], device=self.info.device)
        was_training = self.raw.training
        self.raw.eval()
        out = bytes(int(t) for t in self.raw.generate(prompt, self.cfg.sample_tokens, temperature=0.8, generator=g))
        self.raw.train(was_training)
        return (to_bytes(self.cfg.sample_prompt) + out).decode("utf-8", errors="replace")

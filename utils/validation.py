"""Validation during training: the deterministic pass over the validation split and the fixed-seed
text sample written at each evaluation."""

from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn as nn

from data.dataset import DataError
from models.config import EvalConfig
from utils.distributed import DistInfo, unwrap
from utils.metrics import evaluate


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
        prompt = torch.tensor([list(self.cfg.sample_prompt.encode())], device=self.info.device)
        was_training = self.raw.training
        self.raw.eval()
        out = bytes(int(t) for t in self.raw.generate(prompt, self.cfg.sample_tokens, temperature=0.8, generator=g))
        self.raw.train(was_training)
        return (self.cfg.sample_prompt.encode() + out).decode("utf-8", errors="replace")

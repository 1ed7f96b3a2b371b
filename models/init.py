"""Initial weights as a function of (seed, parameter name) alone, so that one process, DDP and FSDP on
any number of ranks start from the same weights.

Each parameter draws from a generator of its own, seeded from the run's seed and the parameter's
name: its values depend neither on the order the parameters are built in, nor on the device, nor on
how the parameter is sharded. Every rank generates a parameter's full value on the CPU, one
parameter at a time, and keeps its part (`place`). What each parameter's distribution is, GPT-2's
rules, is the model's own (`GPT.init_distributions`).
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

# (full value, parameter) -> what the parameter's copy_ takes: the full value, or this rank's shard of it
Place = Callable[[Tensor, Tensor], Tensor]


def whole(full: Tensor, param: Tensor) -> Tensor:
    return full


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one parameter. Its seed is the crc32 of the name started from the run's seed:
    the same in every process (unlike hash()), and 32 bits, all that torch's mt19937 keeps of a seed."""
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(name.encode(), seed))


def initial_value(shape: torch.Size, mean: float, std: float, generator: torch.Generator) -> Tensor:
    """N(mean, std) in fp32 on the CPU; std 0 is the constant mean (a norm gain, a bias)."""
    if std == 0:
        return torch.full(shape, mean, dtype=torch.float32, device="cpu")
    return torch.normal(mean, std, shape, generator=generator, dtype=torch.float32, device="cpu")


@torch.no_grad()
def init_parameters(model: nn.Module, distributions: dict[Tensor, tuple[float, float]], seed: int,
                    place: Place = whole) -> None:
    """Fill every parameter (a tied one once, under its first name) from its (mean, std) in distributions."""
    for name, param in model.named_parameters():
        mean, std = distributions[param]
        full = initial_value(param.shape, mean, std, param_generator(seed, name))
        param.copy_(place(full.to(param.device), param))

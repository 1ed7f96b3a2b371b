"""Numeric precision, decided in one place: the dtype, the autocast context and the GradScaler.

`train.precision: auto` resolves per device: on CUDA bf16 where the GPU in use has bf16 tensor cores
(compute capability 8.0+, Ampere on), else fp16 with a GradScaler; on MPS fp32 (autocast there is
untested); on a CPU bf16 only where this host's bf16 matmuls are measurably faster than fp32 at the model's own shapes, else fp32. Many
CPUs have no bf16 matrix units and run bf16 several times slower (docs/benchmarks.md). The CPU
measurement is cached per host (utils/host_cache.py), and the resolved name is what the run's
config.yaml and checkpoints record, so resuming and sampling use what training used.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from utils.host_cache import cached, host_key

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_MARGIN = 0.9  # bf16 must take under 90% of fp32's time: "measurably faster", not noise
# rows of the timed matmuls: past about a thousand, the bf16/fp32 ratio no longer depends on the row count,
# while the time does (a GPT-2 batch of 16 x 1024 tokens took 18 s to measure, every start, before the cap)
MAX_TIMED_TOKENS = 1024


class ModelShapes(Protocol):
    """What the CPU measurement needs of a model (models.config.ModelConfig has it)."""
    dim: int
    ffn_dim: int
    context_length: int


@dataclass(frozen=True)
class Precision:
    name: str
    """fp32, bf16 or fp16: never auto"""
    reason: str
    """why, for the start-up line"""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast to bf16/fp16 matmuls on this device type; fp32 runs without autocast."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling against underflow; bf16 has fp32's range and does not."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _time_linears(shapes: list[tuple[int, int, int]], dtype: torch.dtype, g: torch.Generator) -> float:
    """Seconds for one forward matmul at each (tokens, in, out) shape, from fp32 tensors cast to
    dtype as autocast casts them, so the casts count against bf16."""
    mats = [(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)) for m, k, n in shapes]
    for x, w in mats:  # first touch: oneDNN picks and caches its kernel
        torch.nn.functional.linear(x.to(dtype), w.to(dtype))
    t0 = time.perf_counter()
    for x, w in mats:
        torch.nn.functional.linear(x.to(dtype), w.to(dtype))
    return time.perf_counter() - t0


def timed_tokens(model: ModelShapes, batch_size: int) -> int:
    return min(batch_size * model.context_length, MAX_TIMED_TOKENS)


def measure_cpu_bf16(model: ModelShapes, batch_size: int, rounds: int = 5) -> dict:
    """bf16 vs fp32 time of the model's linear layers at its batch (at most MAX_TIMED_TOKENS rows):
    rounds alternate, medians compared."""
    tokens = timed_tokens(model, batch_size)
    shapes = [(tokens, model.dim, 3 * model.dim), (tokens, model.dim, model.dim), (tokens, model.dim, model.ffn_dim),
              (tokens, model.ffn_dim, model.dim)]
    g = torch.Generator().manual_seed(0)  # never the global RNG: a resumed run must draw what an uninterrupted one does
    fp32, bf16 = [], []
    for i in range(rounds):
        fp32.append(_time_linears(shapes, torch.float32, g))
        bf16.append(_time_linears(shapes, torch.bfloat16, g))
        if i >= 1 and min(bf16) > 1.5 * max(fp32):  # clearly slower: no need to wait for all rounds
            break
    ratio = statistics.median(fp32) / statistics.median(bf16)
    return {"precision": "bf16" if ratio > 1 / BF16_MARGIN else "fp32", "bf16_speedup": round(ratio, 3),
            "fp32_ms": round(statistics.median(fp32) * 1e3, 3), "bf16_ms": round(statistics.median(bf16) * 1e3, 3),
            "rounds": len(fp32), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def resolve_precision(setting: str, device: torch.device, model: ModelShapes, batch_size: int,
                      trained_with: str | None = None) -> Precision:
    """The precision `setting` means here; auto keeps a resumed run's own (trained_with)."""
    if setting != "auto":
        return Precision(setting, "set in the config")
    if trained_with in DTYPES:
        return Precision(trained_with, "auto: as the checkpoint being resumed was trained")
    if device.type == "cuda":
        # not torch.cuda.is_bf16_supported(): since torch 2.4 it counts bf16 emulated (slowly) on older GPUs
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return Precision("bf16", f"auto: this GPU (compute capability {major}.{minor}) has bf16 tensor cores")
        return Precision("fp16", f"auto: this GPU (compute capability {major}.{minor}) has no bf16 tensor cores, "
                                 f"fp16 with a GradScaler")
    if device.type != "cpu":
        return Precision("fp32", f"auto: autocast on {device.type} is untested")
    key = host_key(f"linears {timed_tokens(model, batch_size)}x{model.dim}x{model.ffn_dim}")
    entry, where = cached("precision", key, lambda: measure_cpu_bf16(model, batch_size))
    return Precision(entry["precision"], f"auto: bf16 matmuls ran {entry['bf16_speedup']:.2f}x fp32's speed at this "
                                         f"model's widths (fp32 {entry['fp32_ms']} ms, bf16 {entry['bf16_ms']} ms, load "
                                         f"{entry['loadavg_1m']}, {where})")


def sampling_precision(setting: str, trained: str | None, device: torch.device) -> str:
    """Inference and evaluation: auto is the precision the checkpoint trained in, so sampled logits
    match training's; fp16 becomes fp32 on a CPU, whose fp16 kernels are slow."""
    if setting != "auto":
        return setting
    return "fp32" if trained not in DTYPES or (trained == "fp16" and device.type == "cpu") else trained

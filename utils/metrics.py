"""Measuring: deterministic evaluation (loss, perplexity, bits per byte), FLOPs and MFU, and the
logger that writes console lines, logs/train_<run>.log, logs/train_<run>.metrics.jsonl, TensorBoard
events and optionally Weights & Biases (rank 0 only; the sinks are in utils/sinks.py).
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import LoggingConfig
from utils.distributed import DistInfo, all_reduce_sum
from utils.progress import progress
from utils.sinks import JsonlSink, WandbSink, require_wandb
from utils.host_cache import cached, host_key


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
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # DDP's forward may broadcast buffers (the RoPE tables), a collective that a rank with no
        # window to evaluate would never join; evaluation needs no gradient sync anyway
        model = model.module
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


def flops_per_token(n_params: int, n_layers: int, dim: int, context_length: int) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus 12*L*d*T for attention
    scores and their weighted sum, counted over the full T x T matrix as in PaLM (Chowdhery et al.
    2022, appendix B) and nanoGPT. N excludes lookup-only embeddings (see GPT.num_params).
    """
    return 6 * n_params + 12 * n_layers * dim * context_length


# Peak dense (non-sparse) tensor FLOP/s from the vendors' datasheets, by precision used for matmuls.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
}


# device-name patterns, most specific first ("L4" must not match "L40S", nor "A10" match "A100")
_GPU_NAMES = [("H200", "H200"), ("H100 PCIE", "H100 PCIe"), ("H100 NVL", "H100 NVL"), ("H100", "H100 SXM"),
              ("A100", "A100"), ("A10G", "A10G"), ("A10", "A10"), ("L4", "L4"), ("RTX 4090", "RTX 4090")]


def gpu_peak_key(name: str) -> str | None:
    """Map torch.cuda.get_device_name() to a PEAK_FLOPS row, or None when unknown."""
    for pattern, key in _GPU_NAMES:
        if re.search(rf"\b{pattern}\b", name.upper()):
            return key
    return None


def measure_cpu_peak(dtype: torch.dtype, repeats: int = 15, size: int = 1024) -> dict:
    """Best of `repeats` timed size^3 matmuls: a peak is what the CPU reaches, so the fastest run is
    the estimate and slower ones are other work on the machine."""
    g = torch.Generator().manual_seed(0)  # never the global RNG: resumed runs must draw what uninterrupted ones do
    a, b = torch.randn(size, size, generator=g).to(dtype), torch.randn(size, size, generator=g).to(dtype)
    a @ b
    best, done, start = math.inf, 0, time.perf_counter()
    while done < repeats and (done < 3 or time.perf_counter() - start < 2.0):  # slow CPUs: at most ~2 s
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        done += 1
    return {"flops": 2 * size ** 3 / best, "repeats": done, "loadavg_1m": round(os.getloadavg()[0], 2),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def measured_cpu_peak(precision: str) -> tuple[float, str]:
    """(this CPU's matmul FLOP/s at the precision training uses, where the figure came from):
    measured once per host, CPU model, thread count and torch version (utils/host_cache.py), so
    MFU does not move with a peak re-measured at every start."""
    name = "bf16" if precision in ("bf16", "fp16") else "fp32"
    entry, where = cached("cpu_peak", host_key(f"{name} matmul"),
                        lambda: measure_cpu_peak(torch.bfloat16 if name == "bf16" else torch.float32))
    return entry["flops"], where


def gpu_peak_flops(name: str, precision: str, tf32: bool) -> tuple[float | None, str]:
    """(datasheet peak FLOP/s, its source) for a GPU name; None for a GPU not in the table."""
    key = gpu_peak_key(name)
    if key is None:
        return None, f"no peak FLOP/s known for '{name}'; MFU not reported"
    if precision == "fp32" and tf32:
        precision = "tf32"
    return PEAK_FLOPS[key][precision], f"{key} {precision} datasheet peak"


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, where the number comes from); None when the device is not in the table."""
    if device.type == "cpu":
        # a CPU without bf16 units runs bf16 matmuls slower than fp32 ones, and then its fp32 rate is
        # the ceiling of a bf16 run too: the peak is the faster of the two
        kinds = ["fp32"] if precision == "fp32" else ["fp32", "bf16"]
        flops, where, kind = max((*measured_cpu_peak(k), k) for k in kinds)
        return flops, f"measured CPU {kind} matmul peak ({where})"
    if device.type != "cuda":
        return None, f"no peak known for device type {device.type}"
    return gpu_peak_flops(torch.cuda.get_device_name(device), precision, torch.backends.cuda.matmul.allow_tf32)


def model_flops_utilization(tokens_per_sec: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved training FLOP/s of one device over its peak (PaLM's MFU); None when the peak is unknown."""
    return tokens_per_sec * flops_per_token / peak if peak else None


def format_seconds(seconds: float) -> str:
    """'1:02:03' (hours, minutes, seconds); '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class ThroughputMeter:
    """Training time and throughput: only time inside optimizer steps counts (no evaluation,
    saving or start-up), tokens/s is over each log interval, the ETA is from this process's pace."""

    def __init__(self, tokens_per_step: int, total_steps: int, flops_per_token: float, peak: float | None) -> None:
        self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
        self.flops_per_token, self.peak = flops_per_token, peak
        self.train_seconds = 0.0  # restored on resume, so it counts the whole run
        self.started = time.perf_counter()
        self._steps = 0  # steps timed by this process
        self._seconds = 0.0  # their time
        self._interval_steps, self._interval_seconds = 0, 0.0

    @contextmanager
    def step(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        self._seconds += dt
        self._interval_seconds += dt
        self._steps += 1
        self._interval_steps += 1

    def tokens_per_sec(self) -> float:
        """Over the steps since the last call."""
        rate = self._interval_steps * self.tokens_per_step / max(self._interval_seconds, 1e-9)
        self._interval_steps, self._interval_seconds = 0, 0.0
        return rate

    def mfu(self, tokens_per_sec_per_device: float) -> float:
        """Model FLOPs utilisation of one device; NaN when its peak is unknown."""
        mfu = model_flops_utilization(tokens_per_sec_per_device, self.flops_per_token, self.peak)
        return math.nan if mfu is None else mfu

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self, step: int) -> float:
        """Seconds of training left, at this process's pace so far (evaluation not included)."""
        return (self.total_steps - step) * self._seconds / self._steps if self._steps else math.nan


class MetricsLogger:
    """Console + log file + metrics.jsonl + TensorBoard (+ W&B) on the main rank; a no-op elsewhere.

    `config` is the run's whole config as a dict, for W&B's run config.
    """

    def __init__(self, log_dir: str | Path, is_main: bool, run_name: str | None = None,
                 logging: LoggingConfig | None = None, config: dict | None = None) -> None:
        logging = logging or LoggingConfig()
        require_wandb(logging)  # before anything is written, on every rank
        self.is_main = is_main
        self.run_name = run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.file = self.tb = self.path = self.tb_dir = self.jsonl = self.wandb = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = Path(log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            if (log_dir / "tensorboard" / self.run_name).exists():  # two runs started in the same second
                self.run_name += f"-{os.getpid()}"
            self.path = log_dir / f"train_{self.run_name}.log"
            self.file = open(self.path, "a", buffering=1)
            self.tb_dir = log_dir / "tensorboard" / self.run_name
            self.tb = SummaryWriter(str(self.tb_dir))
            self.jsonl = JsonlSink(log_dir / f"train_{self.run_name}.metrics.jsonl")
            if logging.wandb:
                self.wandb = WandbSink(logging, config or {}, self.run_name, log_dir)

    def info(self, msg: str) -> None:
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(msg)
            self.file.write(msg + "\n")

    def file_only(self, msg: str) -> None:
        """For the log file alone (the full resolved config), not the console."""
        if self.is_main:
            self.file.write(msg + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.jsonl.scalars(step, values)
        if self.wandb is not None:
            self.wandb.scalars(step, values)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            # TensorBoard renders markdown; a code block keeps the sample's own line breaks
            self.tb.add_text(tag, "```\n" + text + "\n```", step)
        if self.wandb is not None:
            self.wandb.text(tag, text, step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        if self.tb is not None:
            self.tb.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        if self.is_main:
            self.tb.close()
            self.jsonl.close()
            self.file.close()
        if self.wandb is not None:
            self.wandb.close()

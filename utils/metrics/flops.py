"""Compute: training FLOPs per token, the peak FLOP/s of the device (datasheet for GPUs, measured
once per host for CPUs) and MFU."""

from __future__ import annotations

import math
import os
import re
import time

import torch

from utils.host_cache import cached, host_key


def flops_per_token(n_params: int, n_layers: int, dim: int, context_length: int) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus 12*L*d*T for attention
    scores and their weighted sum, counted over the full T x T matrix as in PaLM (Chowdhery et al.
    2022, appendix B) and nanoGPT. N excludes lookup-only embeddings (see GPT.num_params).
    """
    return 6 * n_params + 12 * n_layers * dim * context_length


# Peak dense (non-sparse) tensor FLOP/s from NVIDIA's datasheets (the "with sparsity" figures halved), by
# the precision used for matmuls: H100 SXM/PCIe/NVL, H800 (the H100 SXM's compute), H200 SXM and NVL, GH200
# (the superchip's Hopper GPU: the H100 SXM's figures), A100, A10G/A10, L4, L40S, RTX 4090.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "GH200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H800 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H800 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
}


# device-name patterns, most specific first ("L4" must not match "L40S", nor "A10" match "A100", nor the
# H200 SXM row take the H200 NVL)
_GPU_NAMES = [("GH200", "GH200"), ("H200 NVL", "H200 NVL"), ("H200", "H200 SXM"), ("H100 PCIE", "H100 PCIe"),
              ("H100 NVL", "H100 NVL"), ("H100", "H100 SXM"), ("H800 PCIE", "H800 PCIe"), ("H800", "H800 SXM"),
              ("A100", "A100"), ("A10G", "A10G"), ("A10", "A10"), ("L40S", "L40S"), ("L4", "L4"),
              ("RTX 4090", "RTX 4090")]


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

"""Which device a process runs on, and the few choices that differ by device type.

`--device auto|cpu|cuda|cuda:N|mps` means the same in every entry point; auto takes CUDA, then
Apple's MPS, then the CPU. Everything else that depends on the device type asks here: whether to
pin host memory, use fused optimizer kernels, how to wait for queued work and what the device is
called. The MPS branches are written from PyTorch's documentation and are untested (no Apple
hardware in CI); they are kept to the checks below.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from utils.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(device_arg: str | None, local_rank: int = 0) -> torch.device:
    """The torch.device for --device (None = auto); a CUDA device without an index takes local_rank's GPU.

    A CUDA device is also made the current one (torch.cuda.set_device), so what names no index (the
    CUDA RNG state a checkpoint saves and restores, "cuda" tensors, NCCL) means this GPU, not cuda:0.
    """
    if device_arg in (None, "auto"):
        if torch.cuda.is_available():
            return _current(torch.device("cuda", local_gpu(local_rank)))
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise UserError(f"--device {device_arg!r} is not a device; use one of {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device_arg} asked for CUDA, but no CUDA GPU is visible "
                            f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
        if device.index is None:
            return _current(torch.device("cuda", local_gpu(local_rank)))
        if device.index >= torch.cuda.device_count():
            raise UserError(f"cuda:{device.index} requested but only {torch.cuda.device_count()} GPU(s) are visible")
        return _current(device)
    if device.type == "mps":
        if not mps_available():
            raise UserError("--device mps asked for Apple's GPU, but MPS is not available here (it needs an Apple "
                            "silicon Mac and a torch built with MPS); use --device cpu, cuda or auto")
        return torch.device("mps")
    if device.type != "cpu":
        raise UserError(f"--device {device_arg} is not supported; use one of {DEVICE_CHOICES}")
    return device


def local_gpu(local_rank: int) -> int:
    """This process's GPU among those it sees: index 0 where it sees one (srun --gpus-per-task=1 or a
    CUDA_VISIBLE_DEVICES of one GPU per process), else its local rank (torchrun, or srun where every
    task sees the node's GPUs)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank >= count:
        raise UserError(f"local rank {local_rank} has no GPU of its own: this process sees {count} GPUs; start at "
                        f"most one process per GPU (torchrun --nproc_per_node, srun --ntasks-per-node), or give "
                        f"each process one GPU (srun --gpus-per-task=1)")
    return local_rank


def check_gpu_per_rank(backend: str, device: torch.device) -> None:
    """NCCL needs a GPU of its own for each process: torchrun's workers that see one GPU between them would all
    take cuda:0 and end in NCCL's "Duplicate GPU detected" (gloo shares a GPU, as gpu_check does on purpose)."""
    workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's workers on this node, which all see alike
    if backend == "nccl" and device.type == "cuda" and workers > torch.cuda.device_count() == 1:
        raise UserError(f"torchrun started {workers} processes on this node, but they see one GPU between them, "
                        f"and NCCL needs one per process; start --nproc_per_node=1, make more GPUs visible "
                        f"(CUDA_VISIBLE_DEVICES), or use distributed.backend=gloo")


def _current(device: torch.device) -> torch.device:
    torch.cuda.set_device(device)
    return device


def pin_memory(device: torch.device) -> bool:
    """Page-locked host buffers pay only for asynchronous copies to a CUDA GPU."""
    return device.type == "cuda"


def fused_adamw(device: torch.device) -> bool:
    """Fused AdamW exists for CUDA and, since torch 2.4, CPU; MPS is left on the default kernel (untested)."""
    return device.type in ("cuda", "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_bf16_support() -> str:
    """The CPU's native bf16 matrix instructions, if /proc/cpuinfo lists any."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return next((f.upper() for f in ("amx_bf16", "avx512_bf16") if f in flags.split()), "no native bf16")


def free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on the device: the GPU's free memory, or the host's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, core count and native bf16 support."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_model()} ({os.cpu_count()} cores, {cpu_bf16_support()})"

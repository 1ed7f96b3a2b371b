"""Any checkpoint, for one process: a file (one process, DDP, compiled) or a sharded folder (FSDP), read
with no process group and no conversion step. inference.py, scripts/evaluate.py, scripts/export_hf.py
and scripts/convert_checkpoint.py load through here; resuming and fine-tuning read a state (`read_state`)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.transformer import GPT
from utils.checkpoint.format import MODEL, OPTIMIZER, build_model, load_checkpoint, save_checkpoint


def read_state(path: str | Path, verify: bool = True, mmap: bool = False) -> dict:
    """A checkpoint's state, but a sharded folder's without its tensors (config, counters: extra.pt); `verify`
    checks every byte against its CRC-32 first, `mmap` maps a file's tensors instead of reading them."""
    if Path(path).is_dir():
        from utils.checkpoint import sharded  # DCP costs ~1.5 s of imports: only for folders

        return sharded.read_extra(path, verify)
    return load_checkpoint(path, mmap=mmap, verify=verify)


def load_weights(path: str | Path) -> dict:
    """Any checkpoint's weights and config on the CPU, verified: a file (one process, DDP, compiled), or a
    sharded folder (FSDP), read in this one process without a group or a conversion."""
    if Path(path).is_dir():
        from utils.checkpoint import sharded  # DCP costs ~1.5 s of imports: only for folders

        weights, extra = sharded.full_model_state(path)
        return {**extra, MODEL: weights}
    return load_checkpoint(path)


def convert(source: str | Path, out_file: str | Path) -> None:
    """Write any checkpoint's weights, config and counters (no optimizer state) as one file, atomically:
    a file that cannot resume training but is small and loads without DCP."""
    state = load_weights(source)
    state.pop(OPTIMIZER, None)
    save_checkpoint(state, out_file, advice="Free space or choose another --out, then run the conversion again")


def load_model(path: str | Path, device: torch.device) -> GPT:
    """Any checkpoint written by training, file or sharded folder, in fp32, for inference."""
    return build_model(load_weights(path), path, device)

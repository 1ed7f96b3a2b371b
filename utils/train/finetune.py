"""Fine-tuning (train.init_from): a new run, at step 0 with a fresh optimizer and schedule, starting from
the weights of any checkpoint (a file, or a sharded folder) on any strategy and world size.

The model section is the checkpoint's: the command line reads it as the base beneath the config file and
the overrides (`model_base`), so they may restate it but not change it, except TUNABLE (`check_init`,
before anything is written). Resuming a fine-tune continues from its own checkpoints and never reads the
init checkpoint again (`model_base`, utils/train/run.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import yaml

from models.config import Config
from models.transformer import GPT
from utils.checkpoint.folder import CONFIG_FILE
from utils.checkpoint.format import CONFIG, MODEL, CheckpointError
from utils.checkpoint.reader import read_state
from utils.distributed.parallel import local_part
from utils.train.preflight import model_changes

# model settings a fine-tune may change: they shape no weight, and inference never uses them
TUNABLE = ("dropout",)


def _read(path: str | Path, verify: bool, key: str = "train.init_from") -> dict:
    """The state (a file's tensors mapped, not read; a folder's without them), errors naming the key."""
    try:
        return read_state(path, verify=verify, mmap=True)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None


def model_base(init_from: str, resume: str | None, checkpoint_dir: str) -> dict:
    """{"model": the fine-tune's model section}, read without verifying or loading any weights: the init
    checkpoint's, or when resuming the run's own (its checkpoint.dir/config.yaml, or the checkpoint named by
    --resume), so a fine-tune resumes after its init checkpoint has been moved or deleted."""
    recorded = Path(checkpoint_dir) / CONFIG_FILE
    if resume == "auto" and recorded.is_file():
        with contextlib.suppress(OSError, yaml.YAMLError, TypeError, KeyError):
            return {"model": dict(yaml.safe_load(recorded.read_text())["model"])}
    if resume not in (None, "auto"):
        return {"model": _read(resume, verify=False, key="--resume")[CONFIG]["model"]}
    return {"model": _read(init_from, verify=False)[CONFIG]["model"]}


def check_init(cfg: Config) -> tuple[Path, dict]:
    """train.init_from's path and state, verified (checkpoint.verify), holding cfg's model."""
    path = Path(cfg.train.init_from)
    state = _read(path, cfg.checkpoint.verify)
    changes = model_changes(cfg, state, free=TUNABLE)
    if changes:
        raise CheckpointError(f"train.init_from={path} holds another model ({'; '.join(changes)}); a fine-tune "
                              f"takes its checkpoint's model: remove those from the config file and overrides (only "
                              f"model.{', model.'.join(TUNABLE)} may change)")
    return path, state


@torch.no_grad()
def load_init(model: GPT, path: Path, state: dict) -> None:
    """Collective: the checkpoint's weights into the built (FSDP: sharded and materialized) model; every rank
    keeps its part of the same full weights."""
    if path.is_dir():
        from utils.checkpoint import sharded  # DCP costs ~1.5 s of imports: only for folders

        sharded.load_sharded_weights(path, model)  # each rank reads only its part
        return
    for name, param in model.named_parameters():  # a tied weight once, under its first name
        param.copy_(local_part(state[MODEL][name].to(param.device), param))

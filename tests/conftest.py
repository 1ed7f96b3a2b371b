"""Shared test helpers: a tiny corpus, tiny-model overrides, and real subprocess launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.prepare_dataset import prepare  # noqa: E402

# Every line differs a little, so a tiny model has something to learn but can still overfit it.
TINY_TEXT = "".join(f"{i % 7} the quick brown fox {'jumps' if i % 3 else 'leaps'} over the lazy dog {i % 5}.\n"
                    for i in range(600))


def make_dataset(out: Path, text: str = TINY_TEXT, val_fraction: float = 0.1) -> Path:
    prepare(out, text.encode(), ["tests"], val_fraction)
    return out


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def tiny_overrides(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A 2-layer, 32-wide model on the tiny corpus, fp32, writing under run_dir."""
    values = {
        "model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.ffn_dim": 64, "model.context_length": 32,
        "data.dir": data_dir, "train.batch_size": 4, "train.max_steps": 6, "train.warmup_steps": 2,
        "train.lr": 1.0e-3, "train.min_lr": 1.0e-4, "train.precision": "fp32", "train.eval_every": 3,
        "train.save_every": 3, "train.log_every": 1, "train.sample_tokens": 8,
        "paths.checkpoint_dir": run_dir / "ckpt", "paths.log_dir": run_dir / "logs",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_script(*args: str | Path, timeout: float = 300, env: dict | None = None, input: str | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repository root."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or child_env(), input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def torchrun_cmd(nproc: int, *args: str | Path, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", *map(str, args)]


def run_torchrun(nproc: int, *args: str | Path, timeout: float = 300, max_restarts: int = 0,
                 check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(nproc, *args, max_restarts=max_restarts), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env or child_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def tb_runs(log_dir: Path) -> list:
    """Every TensorBoard run under log_dir/tensorboard, loaded whole with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for run in sorted((Path(log_dir) / "tensorboard").iterdir()):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        runs.append(acc)
    return runs


def load_weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(autouse=True, scope="session")
def host_cache_dir(tmp_path_factory):
    """Per-host measurements (utils/host_cache.py) go to one folder per test session, not ~/.cache."""
    os.environ["BYTEGPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("host_cache"))

"""Checkpoints: atomic saves, exact resume, damaged files, mismatched models."""

import signal
from pathlib import Path

import pytest
import torch

from conftest import (child_env, load_weights, make_dataset, run_script, run_torchrun, tb_runs, tiny_overrides,
                      train_here)
from models.config import Config
from models.config_loader import config_to_dict
from utils.checkpoint import format as ckpt


def tb_losses(log_dir) -> dict[int, float]:
    """train/loss by step, read back with TensorBoard's own reader over every run in log_dir."""
    return {e.step: e.value for acc in tb_runs(log_dir) for e in acc.Scalars("train/loss")}


def assert_same_run(a, b, step: int) -> None:
    wa, wb = load_weights(a / "ckpt" / f"step_{step:07d}.pt"), load_weights(b / "ckpt" / f"step_{step:07d}.pt")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final parameters differ"
    assert tb_losses(a / "logs") == tb_losses(b / "logs")


# dropout on, so resuming must also restore every RNG to match
RESUME = dict(train__max_steps=8, checkpoint__every=4, eval__every=4, model__dropout=0.1)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    """The uninterrupted 8-step run (data in data/, the run in full/) the resumed ones must equal."""
    tmp = tmp_path_factory.mktemp("unbroken")
    train_here(*tiny_overrides(make_dataset(tmp / "data"), tmp / "full", **RESUME))
    return tmp


def test_resume_is_bit_exact_single_process(unbroken, tmp_path):
    """8 steps == 4 steps (stop_at_step) + --resume auto to 8: same losses and weights, bit for bit."""
    tiny_data, full, split = unbroken / "data", unbroken / "full", tmp_path / "split"
    first = run_script("train_single.py", *tiny_overrides(tiny_data, split, **RESUME, train__stop_at_step=4),
                       check=True)
    assert "stop_at_step=4 reached" in first.stdout and not (split / "ckpt/step_0000008.pt").exists()
    second = run_script("train_single.py", "--resume", "auto", *tiny_overrides(tiny_data, split, **RESUME), check=True)
    assert "resumed from" in second.stdout and "step_0000004.pt at step 4" in second.stdout
    assert_same_run(full, split, 8)


@pytest.mark.slow
def test_resume_is_bit_exact_with_two_ranks(tiny_data, tmp_path):
    """The same with 2 DDP ranks on gloo, each rank's RNG restored."""
    full, split = tmp_path / "full", tmp_path / "split"
    args = ["train_ddp.py", "--device", "cpu"]
    run_torchrun(2, *args, *tiny_overrides(tiny_data, full, **RESUME), check=True)
    run_torchrun(2, *args, *tiny_overrides(tiny_data, split, **RESUME, train__stop_at_step=4), check=True)
    run_torchrun(2, *args, "--resume", "auto", *tiny_overrides(tiny_data, split, **RESUME), check=True)
    assert_same_run(full, split, 8)


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(unbroken, tmp_path):
    """SIGKILL mid-save leaves the earlier checkpoint loadable; auto-resume finishes the run exactly."""
    tiny_data, full, crashed = unbroken / "data", unbroken / "full", tmp_path / "crashed"
    env = child_env(KILL_AT_STEP="8")
    proc = run_script("tests/kill_during_save.py", *tiny_overrides(tiny_data, crashed, **RESUME), env=env)
    assert proc.returncode == -signal.SIGKILL
    assert not (crashed / "ckpt/step_0000008.pt").exists()
    assert list((crashed / "ckpt").glob(".step_0000008.pt.*.tmp")), "the kill should hit mid-save"
    ckpt.load_checkpoint(crashed / "ckpt/step_0000004.pt")
    run_script("train_single.py", "--resume", "auto", *tiny_overrides(tiny_data, crashed, **RESUME), check=True)
    assert not list((crashed / "ckpt").glob(".*.tmp"))
    assert_same_run(full, crashed, 8)


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_previous(tiny_data, tmp_path):
    """Auto-resume skips a truncated newest file with a warning and resumes from the one before."""
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, run, **RESUME)
    run_script("train_single.py", *overrides, check=True)
    newest = run / "ckpt/step_0000008.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = run_script("train_single.py", "--resume", "auto", *overrides, check=True)
    assert "warning: skipping" in proc.stdout and "not a readable checkpoint" in proc.stdout
    assert "resumed from" in proc.stdout and "step_0000004.pt at step 4" in proc.stdout
    ckpt.load_checkpoint(newest)  # rewritten whole by the resumed run


def test_atomic_save_failure_leaves_old_file(tmp_path):
    """An exception during a save (say a full disk) leaves the old file as it was and no temporary."""
    path = tmp_path / "c.pt"
    good = {ckpt.MODEL: {"w": torch.ones(3)}, ckpt.CONFIG: config_to_dict(Config()), ckpt.FORMAT: ckpt.FORMAT_VERSION}
    ckpt.save_checkpoint(good, path)

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*is intact"):
        ckpt.save_checkpoint({**good, "extra": Unpicklable()}, path)
    assert torch.equal(ckpt.load_checkpoint(path)[ckpt.MODEL]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.slow
def test_keep_last_k_and_links(tiny_data, tmp_path):
    """Only the last keep_last step files stay, besides best_model.pt and last_checkpoint.pt."""
    run = tmp_path / "run"
    run_script("train_single.py", *tiny_overrides(tiny_data, run, train__max_steps=10, checkpoint__every=2,
                                                  checkpoint__keep_last=2), check=True)
    names = sorted(p.name for p in (run / "ckpt").iterdir())
    assert names == ["best_model.pt", "config.yaml", "last_checkpoint.pt", "step_0000008.pt", "step_0000010.pt"]
    last = ckpt.load_checkpoint(run / "ckpt/last_checkpoint.pt")
    assert last[ckpt.TRAINER]["step"] == 10 and last[ckpt.FORMAT] == ckpt.FORMAT_VERSION
    assert {"python", "numpy", "torch"} <= last[ckpt.RNG][0].keys()
    assert {ckpt.OPTIMIZER, ckpt.SCHEDULER, ckpt.SCALER, ckpt.CONFIG} <= last.keys()


def test_load_model_weights_lists_differing_keys():
    """A checkpoint of another shape names each key and both shapes."""
    from models.config import ModelConfig
    from models.transformer import GPT

    small, big = GPT(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, context_length=8)), \
        GPT(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=128, context_length=8))
    with pytest.raises(ckpt.CheckpointError, match=r"blocks.0.mlp.fc.weight: checkpoint \(64, 32\) vs model "
                                                   r"\(128, 32\).*blocks.1.*missing from checkpoint"):
        ckpt.load_model_weights(big, small.state_dict(), "x.pt")

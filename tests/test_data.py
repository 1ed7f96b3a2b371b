"""Data: preparation, splits, manifest, and the per-rank batch plan."""

import json

import numpy as np
import pytest

from conftest import run_script
from data.dataset import BatchPlan, DataError, load_split
from data.prepare_dataset import default_corpus


def test_prepare_writes_exact_bytes_and_split(tmp_path):
    """train.bin + val.bin are the input's bytes, the last 10% held out, recorded in the manifest."""
    text = "héllo wörld, bytes not characters. " * 100
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    proc = run_script("data/prepare_dataset.py", "--input", src, "--out", tmp_path / "d", check=True)
    raw = text.encode()
    n_val = int(len(raw) * 0.1)
    assert (tmp_path / "d/train.bin").read_bytes() == raw[: len(raw) - n_val]
    assert (tmp_path / "d/val.bin").read_bytes() == raw[len(raw) - n_val:]
    manifest = json.loads((tmp_path / "d/manifest.json").read_text())
    assert manifest["train_bytes"] == len(raw) - n_val and manifest["val_bytes"] == n_val
    assert "wrote" in proc.stdout
    mtime = (tmp_path / "d/train.bin").stat().st_mtime_ns
    again = run_script("data/prepare_dataset.py", "--input", src, "--out", tmp_path / "d", check=True)
    assert "already up to date" in again.stdout and (tmp_path / "d/train.bin").stat().st_mtime_ns == mtime


def test_folders_and_globs_are_read_in_sorted_order(tmp_path):
    """--input accepts folders and globs; files are joined in a deterministic order."""
    (tmp_path / "src").mkdir()
    for name in ("b.txt", "a.txt"):
        (tmp_path / "src" / name).write_text(name * 50)
    run_script("data/prepare_dataset.py", "--input", tmp_path / "src", "--out", tmp_path / "d1",
               "--val-fraction", "0.5", check=True)
    run_script("data/prepare_dataset.py", "--input", str(tmp_path / "src" / "*.txt"), "--out", tmp_path / "d2",
               "--val-fraction", "0.5", check=True)
    joined = ("a.txt" * 50 + "\n" + "b.txt" * 50).encode()
    for d in ("d1", "d2"):
        assert (tmp_path / d / "train.bin").read_bytes() + (tmp_path / d / "val.bin").read_bytes() == joined


def test_default_corpus_builds_offline():
    """The built-in corpus ships with CPython and is a real English text of at least 400 KB."""
    data, sources = default_corpus()
    assert len(data) >= 400_000 and "pydoc_data" in sources[0]
    assert data.count(b" the ") > 1000


@pytest.mark.parametrize("make_input, message", [
    (lambda p: p.write_text("   \n"), "the input is empty"),
    (lambda p: None, "does not exist"),
])
def test_bad_input_is_one_clear_error(tmp_path, make_input, message):
    """Empty or missing input: one error line, exit 2, nothing written."""
    src = tmp_path / "in.txt"
    make_input(src)
    proc = run_script("data/prepare_dataset.py", "--input", src, "--out", tmp_path / "d")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


def test_missing_dataset_names_the_command(tmp_path):
    """Training on an unprepared folder says which command prepares it."""
    with pytest.raises(DataError, match="python data/prepare_dataset.py --out"):
        load_split(tmp_path / "nothing", "train")


def plan(rank: int, world: int, seed: int = 0, data_len: int = 16 * 64 + 16) -> BatchPlan:
    return BatchPlan(np.zeros(data_len, dtype=np.uint8), 16, batch_size=2, grad_accum_steps=2, rank=rank,
                     world_size=world, seed=seed)


def epoch_windows(world: int, epoch: int, seed: int = 0) -> list[list[int]]:
    plans = [plan(r, world, seed) for r in range(world)]
    steps = plans[0].steps_per_epoch
    return [[int(s) for step in range(epoch * steps, (epoch + 1) * steps) for m in range(2)
             for s in p.window_starts(step, m)] for p in plans]


def test_ranks_cover_an_epoch_once_and_disjointly():
    """Over one epoch the ranks' windows are disjoint and together are every window."""
    per_rank = epoch_windows(world=2, epoch=0)
    p = plan(0, 2)
    phase, _ = p.epoch_order(0)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [phase + i * 16 for i in range(p.n_windows)]


def test_order_reshuffles_per_epoch_and_repeats_with_seed():
    """Epochs differ; the same seed gives the same order; another seed another order."""
    assert epoch_windows(2, 0) != epoch_windows(2, 1)
    assert epoch_windows(2, 0, seed=5) == epoch_windows(2, 0, seed=5)
    assert epoch_windows(2, 0, seed=5) != epoch_windows(2, 0, seed=6)


def test_global_batch_is_independent_of_world_size():
    """2 ranks x B see exactly the windows 1 process x 2B sees, step for step."""
    one = BatchPlan(np.zeros(2000, dtype=np.uint8), 16, 4, 1, 0, 1, seed=3)
    two = [BatchPlan(np.zeros(2000, dtype=np.uint8), 16, 2, 1, r, 2, seed=3) for r in range(2)]
    for step in range(5):
        assert list(one.window_starts(step, 0)) == [s for p in two for s in p.window_starts(step, 0)]


def test_batches_are_the_right_bytes():
    """x is a window of the data and y the same window shifted by one byte."""
    data = np.arange(200, dtype=np.uint8)
    p = BatchPlan(data, 8, 3, 1, 0, 1, seed=0)
    import torch

    x, y = p.batch(0, 0, torch.device("cpu"))
    for row_x, row_y, start in zip(x, y, p.window_starts(0, 0)):
        assert row_x.tolist() == list(range(start, start + 8)) and row_y.tolist() == list(range(start + 1, start + 9))


def test_too_little_data_for_one_batch_is_clear():
    """A split smaller than one global batch says what to lower."""
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchPlan(np.zeros(100, dtype=np.uint8), 16, 8, 1, 0, 2, seed=0)
    with pytest.raises(DataError, match="context_length=16 is longer than the training split"):
        BatchPlan(np.zeros(10, dtype=np.uint8), 16, 1, 1, 0, 1, seed=0)

"""Data: preparation basics, the sharded loader, and the per-rank batch plan's window order."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_script
from data.dataset import BatchPlan, DataError, ShardedBytes, load_split
from data.order import KeyedPermutation
from data.prepare_dataset import default_corpus


def sharded(tmp, whole: np.ndarray, cuts) -> ShardedBytes:
    """whole cut at `cuts` into real shard files."""
    parts = np.split(whole, cuts)
    for i, part in enumerate(parts):
        part.tofile(tmp / f"shard-{i}.bin")
    return ShardedBytes([tmp / f"shard-{i}.bin" for i in range(len(parts))], [len(p) for p in parts])


def split_bytes(data_dir, split: str) -> bytes:
    data = load_split(data_dir, split)
    return data[np.arange(len(data))].tobytes()


def test_prepare_writes_exact_bytes_and_split(tmp_path):
    """The shards are the input's bytes, the last 10% held out, recorded in the manifest; a re-run is a no-op."""
    text = "héllo wörld, bytes not characters. " * 100
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    proc = run_script("-m", "data.prepare_dataset", "--input", src, "--out", tmp_path / "d", check=True)
    raw = text.encode()
    n_val = int(len(raw) * 0.1)
    assert (tmp_path / "d/train-00000.bin").read_bytes() == raw[: len(raw) - n_val]
    assert (tmp_path / "d/val-00000.bin").read_bytes() == raw[len(raw) - n_val:]
    manifest = json.loads((tmp_path / "d/manifest.json").read_text())
    assert manifest["train_bytes"] == len(raw) - n_val and manifest["val_bytes"] == n_val
    assert manifest["sources"] == [str(src)] and manifest["splits"]["test"] == []
    assert "wrote" in proc.stdout
    mtime = (tmp_path / "d/train-00000.bin").stat().st_mtime_ns
    again = run_script("-m", "data.prepare_dataset", "--input", src, "--out", tmp_path / "d", check=True)
    assert "already up to date" in again.stdout and (tmp_path / "d/train-00000.bin").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["manifest.json", "train-00000.bin", "val-00000.bin"]


def test_folders_and_globs_are_read_in_sorted_order(tmp_path):
    """--input accepts folders and globs; files are joined in a deterministic order."""
    (tmp_path / "src").mkdir()
    for name in ("b.txt", "a.txt"):
        (tmp_path / "src" / name).write_text(name * 50)
    run_script("-m", "data.prepare_dataset", "--input", tmp_path / "src", "--out", tmp_path / "d1",
               "--val-fraction", "0.5", check=True)
    run_script("-m", "data.prepare_dataset", "--input", str(tmp_path / "src" / "*.txt"), "--out", tmp_path / "d2",
               "--val-fraction", "0.5", check=True)
    joined = ("a.txt" * 50 + "\n" + "b.txt" * 50).encode()
    for d in ("d1", "d2"):
        assert split_bytes(tmp_path / d, "train") + split_bytes(tmp_path / d, "val") == joined


def test_default_corpus_builds_offline():
    """The built-in corpus ships with CPython and is a real English text of at least 400 KB."""
    data, sources = default_corpus()
    assert len(data) >= 400_000 and "pydoc_data" in sources[0]
    assert data.count(b" the ") > 1000


def test_missing_dataset_names_the_command(tmp_path):
    """Training on an unprepared folder says which command prepares it."""
    with pytest.raises(DataError, match="python -m data.prepare_dataset --out"):
        load_split(tmp_path / "nothing", "train")


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6), data=st.data())
def test_sharded_bytes_index_like_one_array(sizes, data):
    """Slices and integer arrays of any shape over several shards give what one array gives."""
    whole = np.random.default_rng(len(sizes)).integers(0, 256, sum(sizes), dtype=np.uint8)
    start = data.draw(st.integers(0, len(whole)))
    stop = data.draw(st.integers(start, len(whole)))
    ref = whole[start:stop]
    idx = np.array(data.draw(st.lists(st.integers(-len(ref), len(ref) - 1), min_size=1, max_size=12))) \
        if len(ref) else None
    with tempfile.TemporaryDirectory() as tmp:
        view = sharded(Path(tmp), whole, np.cumsum(sizes)[:-1])[start:stop]
        assert len(view) == len(ref)
        if idx is not None:
            assert np.array_equal(view[idx.reshape(-1, 1)], ref[idx.reshape(-1, 1)])
            assert view[idx].dtype == np.uint8
        with pytest.raises(IndexError):
            view[np.array([len(ref)])]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), key=st.integers(0, 2**64 - 1))
def test_keyed_order_is_a_permutation(n, key):
    """For any size and key, the order takes every index exactly once."""
    order = KeyedPermutation(n, key)(np.arange(n))
    assert np.array_equal(np.sort(order), np.arange(n))


def test_keyed_order_depends_on_the_key():
    """Different keys give different orders, and none is the identity."""
    orders = [tuple(KeyedPermutation(1000, key)(np.arange(1000))) for key in range(4)]
    assert len(set(orders)) == 4 and tuple(range(1000)) not in orders


def epoch_windows(world: int, batch: int, accum: int, seed: int, data_len: int, T: int, epoch: int) -> list[int]:
    """Every window start of one epoch in global order: step, micro-step, then rank."""
    plans = [BatchPlan(np.zeros(data_len, dtype=np.uint8), T, batch, accum, r, world, seed) for r in range(world)]
    steps = plans[0].steps_per_epoch
    return [int(s) for step in range(epoch * steps, (epoch + 1) * steps) for m in range(accum)
            for p in plans for s in p.window_starts(step, m)]


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), accum=st.integers(1, 3), seed=st.integers(0, 2**31), extra=st.integers(0, 500),
       T=st.sampled_from([4, 8, 16]))
def test_global_order_is_the_same_for_1_2_4_ranks_and_each_epoch_a_permutation(batch, accum, seed, extra, T):
    """1 x 4B, 2 x 2B and 4 x B ranks see the same windows step for step; an epoch takes distinct
    windows, all of them when they divide evenly into global batches, and the next epoch reshuffles."""
    per_step = 4 * batch * accum
    data_len = T * per_step * 3 + T + extra
    runs = {w: epoch_windows(w, 4 * batch // w, accum, seed, data_len, T, 0) for w in (1, 2, 4)}
    assert runs[1] == runs[2] == runs[4]
    plan = BatchPlan(np.zeros(data_len, dtype=np.uint8), T, 4 * batch, accum, 0, 1, seed)
    phase, _ = plan.epoch_order(0)
    every = {phase + i * T for i in range(plan.n_windows)}
    assert len(set(runs[1])) == len(runs[1]) == plan.steps_per_epoch * per_step and set(runs[1]) <= every
    if plan.n_windows % per_step == 0:
        assert set(runs[1]) == every
    assert epoch_windows(1, 4 * batch, accum, seed, data_len, T, 1) != runs[1]


def test_order_repeats_with_seed_and_costs_nothing_for_a_huge_corpus():
    """The same seed gives the same order, another seed another; a 10^12-byte split needs no memory
    and no start-up work beyond its length."""
    assert epoch_windows(2, 2, 2, 5, 2000, 16, 0) == epoch_windows(2, 2, 2, 5, 2000, 16, 0)
    assert epoch_windows(2, 2, 2, 5, 2000, 16, 0) != epoch_windows(2, 2, 2, 6, 2000, 16, 0)
    huge = np.broadcast_to(np.uint8(0), (10**12,))  # a real array of 10^12 bytes backed by one byte
    plan = BatchPlan(huge, 512, 32, 1, 0, 1, seed=0)
    starts = plan.window_starts(plan.steps_per_epoch - 1, 0)
    assert len(set(starts.tolist())) == 32 and starts.max() + 513 <= len(huge)
    x, y = plan.batch(10**6, 0, torch.device("cpu"))
    assert x.shape == (32, 512)


def test_batches_are_the_right_bytes(tmp_path):
    """x is a window of the data and y the same window shifted by one byte, across shard boundaries."""
    whole = np.arange(200, dtype=np.uint8)
    p = BatchPlan(sharded(tmp_path, whole, [37, 90, 91]), 8, 3, 1, 0, 1, seed=0)
    x, y = p.batch(0, 0, torch.device("cpu"))
    for row_x, row_y, start in zip(x, y, p.window_starts(0, 0)):
        assert row_x.tolist() == list(range(start, start + 8)) and row_y.tolist() == list(range(start + 1, start + 9))


def test_too_little_data_for_one_batch_is_clear():
    """A split smaller than one global batch says what to lower."""
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchPlan(np.zeros(100, dtype=np.uint8), 16, 8, 1, 0, 2, seed=0)
    with pytest.raises(DataError, match="context_length=16 is longer than the training split"):
        BatchPlan(np.zeros(10, dtype=np.uint8), 16, 1, 1, 0, 1, seed=0)

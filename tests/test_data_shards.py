"""Data on disk: splits and shards cover every byte once, --append, verification at training start,
resume across shard boundaries, and the test split that only evaluation reads."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_TEXT, run_here, run_script, tiny_overrides
from data.dataset import ShardedBytes, load_split
from data.prepare_dataset import prepare
from data.shards import DataError, verify_dataset
from test_checkpoint import RESUME, assert_same_run


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(10, 400), shard_size=st.integers(1, 64), val=st.floats(0.01, 0.5), test=st.floats(0.0, 0.4),
       pieces=st.integers(1, 5))
def test_splits_and_shards_cover_every_byte_once(n, shard_size, val, test, pieces):
    """train + val + test shards, in order, are exactly the input; each shard fits, matches its size
    and sha256 in the manifest; the splits have the requested sizes."""
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes().replace(b" ", b"x")
    chunks = [data[i * n // pieces:(i + 1) * n // pieces] for i in range(pieces)]
    v, t = int(n * val), int(n * test)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "d"
        if n - v - t < 2 or v < 2 or (test > 0 and t < 2):
            with pytest.raises(DataError, match="each needs at least 2"):
                prepare(out, chunks, ["gen"], val, test, shard_size=shard_size)
            assert not out.exists()
            return
        manifest, wrote = prepare(out, chunks, ["gen"], val, test, shard_size=shard_size)
        assert wrote
        assert (manifest["train_bytes"], manifest["val_bytes"], manifest["test_bytes"]) == (n - v - t, v, t)
        joined = b""
        for split in ("train", "val", "test"):
            for entry in manifest["splits"][split]:
                raw = (out / entry["file"]).read_bytes()
                assert 0 < len(raw) == entry["bytes"] <= shard_size
                assert hashlib.sha256(raw).hexdigest() == entry["sha256"]
                joined += raw
        assert joined == data
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["manifest.json"] + [e["file"] for s in manifest["splits"].values() for e in s])


def test_append_adds_shards_keeps_old_ones_and_is_idempotent(tmp_path):
    """--append splits new input into new shards; old shards stay byte-identical (not even rewritten);
    appending the same input again changes nothing; the manifest records every source."""
    (tmp_path / "a.txt").write_text("alpha " * 40)
    (tmp_path / "b.txt").write_text("bravo " * 60)
    out = tmp_path / "d"
    prep = ["-m", "data.prepare_dataset", "--out", out, "--shard-size", "64", "--val-fraction", "0.25"]
    run_script(*prep, "--input", tmp_path / "a.txt", check=True)
    before = snapshot(out)
    first = run_script(*prep, "--input", tmp_path / "b.txt", "--append", check=True)
    assert "appended to" in first.stdout
    after = snapshot(out)
    assert all(after[name] == before[name] for name in before if name != "manifest.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")] and len(manifest["parts"]) == 2
    a, b = b"alpha " * 40, b"bravo " * 60
    train = load_split(out, "train")
    val = load_split(out, "val")
    assert train[np.arange(len(train))].tobytes() == a[:180] + b[:270]
    assert val[np.arange(len(val))].tobytes() == a[180:] + b[270:]
    again = run_script(*prep, "--input", tmp_path / "b.txt", "--append", check=True)
    assert "already up to date" in again.stdout and snapshot(out) == after


def test_prepare_again_with_other_input_replaces_the_dataset(tmp_path):
    """Without --append a new input replaces the dataset and its stale shards are removed."""
    (tmp_path / "a.txt").write_text("a" * 1000)
    (tmp_path / "b.txt").write_text("b" * 100)
    for name in ("a.txt", "b.txt"):
        run_script("-m", "data.prepare_dataset", "--input", tmp_path / name, "--out", tmp_path / "d", "--shard-size",
                   "64", check=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["manifest.json", "train-00000.bin",
                                                                   "train-00001.bin", "val-00000.bin"]
    assert load_split(tmp_path / "d", "train")[np.arange(90)].tobytes() == b"b" * 90


def test_verification_refuses_changed_shards(tmp_path, capfd):
    """Sizes are always checked, contents with sha256; training with data.verify=true refuses a
    same-size change in one line, and a removed shard is named."""
    data = tmp_path / "d"
    prepare(data, [TINY_TEXT.encode()], ["tests"], 0.1, shard_size=4096)
    verify_dataset(data, sha256=True)
    shard = data / "train-00002.bin"
    raw = bytearray(shard.read_bytes())
    raw[7] ^= 1
    shard.write_bytes(raw)
    verify_dataset(data, sha256=False)  # same size: only the hash can tell
    with pytest.raises(DataError, match="train-00002.bin does not match its sha256"):
        verify_dataset(data, sha256=True)
    proc = run_here(capfd, "train_single.py", *tiny_overrides(data, tmp_path / "run"), "data.verify=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {shard} does not match its sha256 in manifest.json: "
                                                f"its contents changed after preparation; prepare the dataset again"]
    (data / "val-00000.bin").unlink()
    with pytest.raises(DataError, match="val-00000.bin is missing but manifest.json lists it"):
        verify_dataset(data)


@pytest.mark.slow
def test_resume_across_shard_boundaries_is_bit_exact(tmp_path):
    """With the training split in 256-byte shards and batches that straddle them, 8 steps == 4 + resume to 8."""
    data = tmp_path / "data"
    prepare(data, [TINY_TEXT.encode()], ["tests"], 0.1, shard_size=256)
    train = load_split(data, "train")
    assert isinstance(train, ShardedBytes) and len(train.paths) > 100
    from data.dataset import BatchPlan

    plan = BatchPlan(train, 32, 4, 1, 0, 1, seed=1337)
    starts = np.concatenate([plan.window_starts(step, 0) for step in range(4, 8)])
    assert any(((starts < end) & (starts + 33 > end)).any() for end in train.ends[:-1]), "no window crosses a shard"
    full, split = tmp_path / "full", tmp_path / "split"
    run_script("train_single.py", *tiny_overrides(data, full, **RESUME), check=True)
    run_script("train_single.py", *tiny_overrides(data, split, **RESUME, train__stop_at_step=4), check=True)
    run_script("train_single.py", "--resume", "auto", *tiny_overrides(data, split, **RESUME), check=True)
    assert_same_run(full, split, 8)


@pytest.mark.slow
def test_training_never_reads_the_test_split_and_evaluate_reports_it(tmp_path):
    """Training runs with the test shards removed; scripts/evaluate.py --split test reports on them."""
    data = tmp_path / "data"
    manifest, _ = prepare(data, [TINY_TEXT.encode()], ["tests"], 0.1, 0.1, shard_size=2048)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for entry in manifest["splits"]["test"]:
        shutil.move(data / entry["file"], hidden / entry["file"])
    run = tmp_path / "run"
    run_script("train_single.py", *tiny_overrides(data, run, train__max_steps=2, train__eval_every=2,
                                                  train__save_every=2), check=True)
    proc = run_script("-m", "scripts.evaluate", "--checkpoint", run / "ckpt/last_checkpoint.pt", "--split", "test")
    assert proc.returncode == 2 and "test-00000.bin is missing" in proc.stderr
    for entry in manifest["splits"]["test"]:
        shutil.move(hidden / entry["file"], data / entry["file"])
    run_script("-m", "scripts.evaluate", "--checkpoint", run / "ckpt/last_checkpoint.pt", "--split", "test", "--json",
               tmp_path / "test.json", check=True)
    result = json.loads((tmp_path / "test.json").read_text())
    assert result["source"] == f"test split of {data}" and result["bytes"] == manifest["test_bytes"] - 1
    assert 0 < result["bits_per_byte"] < 8.5

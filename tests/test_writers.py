"""Writers and their folders. One writer per folder: writers started into one folder at once (real processes,
released together by a gate: claims, dataset preparations, training runs, loggers), stale claims of killed
processes, a dataset preparation's temporaries and commit. And no command writes over or into its own input."""

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from conftest import finish, kill_tree, make_dataset, read_until, start, tiny_overrides
from data.shards import DataError, ShardWriter, Stage, commit, verify_dataset
from utils.folder_lock import LOCK, STALE_AFTER_S, FolderBusy, FolderLock

# imports first, then waits for the gate: the writers start their real work within milliseconds of each other
GATE = """
open(sys.argv[1] + f".{os.getpid()}", "w").close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.002)
"""
CLAIM = """import sys, time
from utils.folder_lock import FolderLock
FolderLock(sys.argv[1], "a test holder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def gated(gate: Path, prelude: str, body: str, runs: list[list]) -> list:
    """Start `python -c prelude; wait for the gate; body` once per argument list; opens the gate once every one
    has run its prelude (the imports). The processes, running."""
    code = f"import os, sys, time\n{prelude}\n{GATE}\n{body}\n"
    procs = [start([sys.executable, "-c", code, gate, *args]) for args in runs]
    deadline = time.monotonic() + 120
    while len(list(gate.parent.glob(gate.name + ".*"))) < len(procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a writer did not start"
        time.sleep(0.01)
    gate.touch()
    return procs


def test_a_live_holder_is_refused_in_one_line_and_a_killed_ones_claim_is_taken_over(tmp_path):
    """A second claim names the live holder; once the holder is SIGKILLed its lock is stale and claimed again."""
    holder = start([sys.executable, "-c", CLAIM, tmp_path / "f"])
    read_until(holder, "held", timeout=60)
    with pytest.raises(FolderBusy, match=f"in use by a test holder \\(pid {holder.pid} on {socket.gethostname()}"):
        FolderLock(tmp_path / "f", "a second").acquire()
    kill_tree(holder.pid)
    holder.wait(10)
    with FolderLock(tmp_path / "f", "a second"):
        assert json.loads((tmp_path / "f" / LOCK).read_text())["what"] == "a second"
    assert not any((tmp_path / "f").iterdir())  # the claim went with its release


def test_reused_pid_and_silent_other_host_are_stale_but_a_fresh_heartbeat_holds(tmp_path):
    """Same host: a live pid with another start time is a dead holder. Another host: only the heartbeat decides."""
    lock = tmp_path / LOCK
    record = {"host": socket.gethostname(), "pid": os.getpid(), "start": "1", "since": 0, "what": "old", "token": "x"}
    lock.write_text(json.dumps(record))
    FolderLock(tmp_path, "new").acquire().release()
    lock.write_text(json.dumps({**record, "host": "elsewhere", "start": ""}))
    with pytest.raises(FolderBusy, match="in use by old"):
        FolderLock(tmp_path, "new").acquire()
    os.utime(lock, (time.time() - STALE_AFTER_S - 1,) * 2)
    FolderLock(tmp_path, "new").acquire().release()
    assert not lock.exists()


def test_release_removes_only_its_own_claim(tmp_path):
    """A lock that is no longer this claim's (taken over as stale) stays when the old claim is released."""
    first = FolderLock(tmp_path, "first").acquire()
    record = json.loads((tmp_path / LOCK).read_text())
    (tmp_path / LOCK).write_text(json.dumps({**record, "token": "someone else"}))
    first.release()
    assert (tmp_path / LOCK).exists()


@pytest.mark.parametrize("stale", [False, True])
def test_claims_at_once_have_one_winner(tmp_path, stale):
    """Eight processes claiming one folder at the same instant (free, or held by a dead process): exactly one
    holds it, seven are refused."""
    if stale:
        dead = start([sys.executable, "-c", "pass"])
        finish(dead, timeout=30)
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "1",
                                                        "since": 0, "what": "dead", "token": "x"}))
    procs = gated(tmp_path / "go", "from utils.folder_lock import FolderLock",
                  "FolderLock(sys.argv[2], 'x').acquire()\ntime.sleep(600)", [[tmp_path / "f"]] * 8)
    deadline = time.monotonic() + 60
    while sum(p.poll() is not None for p in procs) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    running = [p for p in procs if p.poll() is None]
    assert len(running) == 1
    kill_tree(running[0].pid)
    refused = [finish(p, timeout=10) for p in procs if p is not running[0]]
    assert all(r.returncode == 2 and "is in use by x" in r.stderr for r in refused), [r.stderr for r in refused]


def write_text_file(path: Path, seed: int, size: int) -> Path:
    import random

    words = [f"w{seed}x{i}" for i in range(500)]
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(words) for _ in range(size // 6)))
    return path


@pytest.mark.parametrize("same_input", [True, False])
def test_two_preparations_at_once_leave_one_whole_dataset(tmp_path, same_input):
    """Two dataset preparations into one folder at the same instant: each says what it did truthfully (wrote,
    up to date, or refused as the folder is in use), and the folder holds one whole dataset, nothing else."""
    a = write_text_file(tmp_path / "a.txt", 1, 3 << 20)
    b = a if same_input else write_text_file(tmp_path / "b.txt", 2, 3 << 20)
    out = tmp_path / "data"
    procs = gated(tmp_path / "go", "from data.prepare_dataset import main", "sys.exit(main(sys.argv[2:]))",
                  [["--input", src, "--out", out, "--shard-size", "32K"] for src in (a, b)])
    results = [finish(p, timeout=180) for p in procs]
    for r in results:
        assert (r.returncode == 0 and ("wrote" in r.stdout or "up to date" in r.stdout)) or \
               (r.returncode == 2 and "is in use by a dataset preparation" in r.stderr), (r.stdout, r.stderr)
    assert any(r.returncode == 0 for r in results)
    manifest = verify_dataset(out, sha256=True)
    text = b"".join((out / e["file"]).read_bytes() for split in ("train", "val", "test")
                    for e in manifest["splits"][split])
    assert text in (a.read_bytes(), b.read_bytes())
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(e["file"] for split in ("train", "val",
                                                             "test") for e in manifest["splits"][split])])


def test_commit_refuses_a_vanished_temporary_and_cleanup_spares_other_writers(tmp_path):
    """A staged shard removed under the writer: nothing is committed; a writer's cleanup removes only its own."""
    make_dataset(tmp_path)
    before = (tmp_path / "manifest.json").read_bytes()
    ours, theirs = Stage(tmp_path), Stage(tmp_path)
    writer = ShardWriter(ours, "train", 0, 4)
    writer.write(b"0123456789")
    staged = writer.close()
    theirs.path("x").write_bytes(b"other")
    ours.path(staged[1]["file"]).unlink()
    manifest = json.loads(before)
    manifest["splits"]["train"] = staged
    with pytest.raises(DataError, match="vanished or changed while this run wrote it"):
        commit(ours, manifest, staged, replaced=None)
    assert (tmp_path / "manifest.json").read_bytes() == before
    ours.remove()
    assert theirs.path("x").exists() and not list(tmp_path.glob(f".*.{ours.tag}.tmp"))


def seeds_in(ckpt: Path) -> set[int]:
    import torch

    found = {torch.load(p, weights_only=True)["config"]["train"]["seed"] for p in ckpt.glob("*.pt")}
    return found | {int(line.split(":")[1]) for line in (ckpt / "config.yaml").read_text().splitlines()
                    if line.strip().startswith("seed:")}


@pytest.mark.slow
def test_two_training_runs_started_at_once_into_one_folder_one_is_refused(tiny_data, tmp_path):
    """Two fresh runs into one checkpoint.dir at the same instant: one trains, the other is refused in one line
    (the folder in use, or already holding the first run), and every file there is the winner's."""
    runs = [tiny_overrides(tiny_data, tmp_path, train__seed=seed, logging__dir=tmp_path / f"logs{seed}",
                           train__max_steps=3) for seed in (1, 2)]
    procs = gated(tmp_path / "go", "from train_single import main", "sys.exit(main(sys.argv[2:]))", runs)
    results = [finish(p, timeout=300) for p in procs]
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-500:] for r in results]
    loser = next(r for r in results if r.returncode == 2)
    line = loser.stderr.strip()
    assert "\n" not in line and ("is in use by a training run" in line or "already holds a run" in line), line
    winner_seed = 1 + [r.returncode for r in results].index(0)
    assert seeds_in(tmp_path / "ckpt") == {winner_seed}


@pytest.mark.slow
def test_a_requeued_resume_is_refused_while_the_old_job_lives(tiny_data, tmp_path):
    """--resume auto into a folder whose run still trains is refused in one line naming it; once that run is
    killed (SIGKILL: no release), its claim is stale and the folder's own checks decide again."""
    overrides = tiny_overrides(tiny_data, tmp_path, train__max_steps=100000)
    old = start([sys.executable, "train_single.py", *overrides], merge_stderr=True)
    read_until(old, "step 1/", timeout=240)
    requeued = finish(start([sys.executable, "train_single.py", "--resume", "auto", *overrides]), timeout=240)
    line = requeued.stderr.strip()
    assert requeued.returncode == 2 and "\n" not in line, line
    assert line.startswith(f"error: {tmp_path / 'ckpt'} is in use by a training run (pid {old.pid} on "
                           f"{socket.gethostname()}, since "), line
    kill_tree(old.pid)
    old.wait(30)
    fresh = finish(start([sys.executable, "train_single.py", *overrides]), timeout=240)
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr, fresh.stderr


# -- no command destroys its own input ----------------------------------------------------------------
CONFIG = Path(__file__).parents[1] / "configs/cpu_quickstart.yaml"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A resumable checkpoint file (weights, optimizer state, config), written directly: no training needed."""
    import torch

    from models.config_loader import config_to_dict, load_config
    from models.transformer import GPT
    from utils.checkpoint.format import CONFIG, FORMAT, FORMAT_VERSION, MODEL, OPTIMIZER, TRAINER, save_checkpoint

    cfg = load_config(None, ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=64",
                             "model.context_length=16"])
    model = GPT(cfg.model)
    state = {MODEL: model.state_dict(), OPTIMIZER: torch.optim.AdamW(model.parameters()).state_dict(),
             CONFIG: config_to_dict(cfg), FORMAT: FORMAT_VERSION, TRAINER: {"step": 1}}
    (tmp_path / "run").mkdir()
    save_checkpoint(state, tmp_path / "run/step_0000001.pt")
    return tmp_path / "run/step_0000001.pt"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"/" for p in sorted(root.rglob("*"))}


def destructive_commands(tmp: Path, ckpt: Path) -> dict[str, tuple[str, list]]:
    """command name -> (module, argv) whose output is, holds or lies inside one of its inputs."""
    (tmp / "corpus").mkdir()
    (tmp / "corpus/a.txt").write_text("some text to prepare " * 50)
    for log in ("nanogpt.log", "curves.svg"):  # a nanoGPT log, whatever its name
        (tmp / log).write_text("step 0: train loss 4.0, val loss 4.1\n")
    (tmp / "link.pt").symlink_to(ckpt)
    os.link(ckpt, tmp / "hard.pt")
    return {
        "convert onto its input": ("scripts.convert_checkpoint", ["--checkpoint", ckpt, "--out", ckpt]),
        "convert onto a symlink to it": ("scripts.convert_checkpoint", ["--checkpoint", ckpt, "--out",
                                                                        tmp / "link.pt"]),
        "convert onto a hard link to it": ("scripts.convert_checkpoint", ["--checkpoint", tmp / "hard.pt", "--out",
                                                                          ckpt]),
        "convert via ..": ("scripts.convert_checkpoint", ["--checkpoint", ckpt, "--out",
                                                          ckpt.parent / "../run" / ckpt.name]),
        "export into the checkpoint's folder": ("scripts.export_hf", ["--checkpoint", ckpt.parent, "--out",
                                                                       ckpt.parent / "hf"]),
        "evaluate --json onto the checkpoint": ("scripts.evaluate", ["--checkpoint", ckpt, "--text-file",
                                                                      tmp / "corpus/a.txt", "--json", ckpt]),
        "prepare into the input folder": ("data.prepare_dataset", ["--input", tmp / "corpus", "--out", tmp / "corpus"]),
        "prepare inside the input folder": ("data.prepare_dataset", ["--input", tmp / "corpus", "--out",
                                                                     tmp / "corpus/data"]),
        "prepare into a folder holding the input": ("data.prepare_dataset", ["--input", tmp / "corpus/a.txt", "--out",
                                                                             tmp]),
        "plot onto its log": ("scripts.plot_runs", [tmp / "nanogpt.log", "--out", tmp / "nanogpt.log"]),
        "plot's svg onto its log": ("scripts.plot_runs", [tmp / "curves.svg", "--out", tmp / "curves.png"]),
        "ablate --json onto its config": ("dev.ablate", ["--config", tmp / "corpus/a.txt", "--variant", "a",
                                                         "--budget", "1", "--json", tmp / "corpus/a.txt"]),
        "record inside its nanoGPT checkout": ("dev.record", ["--out", tmp / "corpus/rec", "--run", f"a={CONFIG}",
                                                              "--nanogpt", tmp / "corpus"]),
    }


@pytest.mark.parametrize("name", [
    "convert onto its input", "convert onto a symlink to it", "convert onto a hard link to it", "convert via ..",
    "export into the checkpoint's folder", "evaluate --json onto the checkpoint", "prepare into the input folder",
    "prepare inside the input folder", "prepare into a folder holding the input", "plot onto its log",
    "plot's svg onto its log", "ablate --json onto its config", "record inside its nanoGPT checkout"])
def test_no_command_writes_over_or_into_its_input(capsys, tmp_path, checkpoint, name):
    """A command whose output is its input, holds it or lies inside it refuses in one line, before it writes."""
    import importlib

    module, argv = destructive_commands(tmp_path, checkpoint)[name]
    before = snapshot(tmp_path)
    code = importlib.import_module(module).main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the input" in err and "choose another" in err, err
    assert snapshot(tmp_path) == before


def test_a_run_started_in_the_same_second_into_one_logging_dir_gets_its_own_name(tmp_path, monkeypatch):
    """Two runs of one name started into one logging.dir in the same second: the second looked before the first
    had created anything (Path.exists says no), yet creating the TensorBoard folder claims the name atomically,
    so each writes its own log and event file."""
    from models.config import LoggingConfig
    from utils.metrics.logger import MetricsLogger

    first = MetricsLogger(tmp_path, True, "run-x", logging=LoggingConfig())
    monkeypatch.setattr(Path, "exists", lambda self: False)
    second = MetricsLogger(tmp_path, True, "run-x", logging=LoggingConfig())
    monkeypatch.undo()
    first.close()
    second.close()
    assert first.path != second.path and first.tb_dir != second.tb_dir
    assert all(len(list(log.tb_dir.iterdir())) == 1 for log in (first, second))


def test_a_checkpointer_holds_its_folder_from_claim_to_release(tmp_path):
    """A second claim on a claimed checkpoint folder is refused; a release after a refused start leaves no
    trace, one after an accepted run leaves the run's files and no lock."""
    import torch

    from utils.checkpoint.folder import CONFIG_FILE, Checkpointer
    from utils.checkpoint.format import CheckpointError
    from utils.distributed.process_group import DistInfo

    def checkpointer() -> Checkpointer:
        return Checkpointer(tmp_path / "runs/ckpt", 1, DistInfo(0, 0, 1, torch.device("cpu"), None))

    first = checkpointer()
    first.claim()
    with pytest.raises(CheckpointError, match=f"is in use by a training run \\(pid {os.getpid()}"):
        checkpointer().claim()
    first.release()
    assert not (tmp_path / "runs").exists()
    second = checkpointer()
    second.claim()
    assert second.find_resume(None, warn=print) is None
    second.accept("model: {}\n")
    second.release()
    assert [p.name for p in (tmp_path / "runs/ckpt").iterdir()] == [CONFIG_FILE]

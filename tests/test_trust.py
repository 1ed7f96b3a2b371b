"""Nothing saved is lost and nothing ends in a traceback, with real processes: Ctrl-C, a disk that
fills up or turns read-only mid-run, a closed stdout, unwritable outputs, and ranks that disagree."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, child_env, finish, run_here, run_torchrun, start, tiny_overrides
from utils.checkpoint import format as ckpt
from utils.checkpoint.folder import Checkpointer
from utils.checkpoint.format import CheckpointError, save_checkpoint
from utils.distributed.process_group import DistInfo
from utils.errors import EXIT_BROKEN_PIPE, EXIT_PREEMPTED
from utils.train.stopping import StopFlag

CPU = DistInfo(0, 0, 1, torch.device("cpu"), None)
LONG = dict(train__max_steps=300, eval__every=0, checkpoint__every=0, eval__sample_tokens=0)


def start_training(*overrides: str) -> subprocess.Popen:
    """A real training run; conftest kills it and everything under it when the test ends."""
    return start([sys.executable, "train_single.py", *overrides])


def wait_for_line(proc: subprocess.Popen, fragment: str) -> None:
    for line in proc.stdout:
        if fragment in line:
            return
    raise AssertionError(f"process ended before '{fragment}': {proc.stderr.read()}")


def test_sigint_saves_and_exits_75_without_traceback(tiny_data, tmp_path):
    """Ctrl-C behaves as SIGTERM: the step finishes, a checkpoint is saved, exit 75."""
    proc = start_training(*tiny_overrides(tiny_data, tmp_path, **LONG))
    wait_for_line(proc, "step 3/")
    proc.send_signal(signal.SIGINT)
    done = finish(proc, 120)
    out, err = done.stdout, done.stderr
    assert done.returncode == EXIT_PREEMPTED, err
    assert "Traceback" not in err + out and "stop signal received (SIGINT)" in out
    step = int(out.split("stopped at step ")[1].split(";")[0])
    assert ckpt.load_checkpoint(tmp_path / f"ckpt/step_{step:07d}.pt")[ckpt.TRAINER]["step"] == step


def test_second_ctrl_c_aborts_at_once():
    """The first SIGINT asks to stop after the step; a second raises KeyboardInterrupt (abort now); and
    the handler from before comes back (Python's own, or SIG_IGN in a job started in the background)."""
    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGINT) is before


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, as root; skipped with the reason elsewhere."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def remount_read_only(mnt: Path, patience: float = 30) -> None:
    """The kernel refuses (busy) while a file is open for writing there, as during a save: try again
    until the save in flight has closed its file."""
    deadline = time.monotonic() + patience
    while (done := subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)).returncode:
        assert "busy" in done.stderr and time.monotonic() < deadline, done.stderr
        time.sleep(0.01)


@pytest.mark.parametrize("fault", ["full", pytest.param("read-only", marks=pytest.mark.slow)])
def test_disk_fault_mid_run_is_one_line_and_keeps_the_last_checkpoint(tiny_data, tmp_path, small_disk, fault):
    """The next save fails with one line and exit 2; the checkpoint saved before still loads."""
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, run, **{**LONG, "checkpoint__every": 2}) + [f"checkpoint.dir={small_disk}"]
    proc = start_training(*overrides)
    wait_for_line(proc, f"saved {small_disk / 'step_0000002.pt'}")
    if fault == "full":
        fill(small_disk)
    else:
        remount_read_only(small_disk)
    done = finish(proc, 120)
    err = done.stderr
    assert done.returncode == 2, err
    # which file of the save meets the fault depends on timing: the step file, last_checkpoint.pt or a pruning
    assert err.startswith("error: could not ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert ("no space left on device" in err.lower()) if fault == "full" else ("read-only" in err.lower()), err
    if fault == "full":
        (small_disk / "filler").unlink()
    newest = Checkpointer(small_disk, 3, CPU).find_resume("auto", warn=print)
    assert newest is not None and newest[1][ckpt.TRAINER]["step"] >= 2


def test_a_folder_that_turns_read_only_after_the_step_file_is_one_line(small_disk):
    """The step file is written, then the folder turns read-only: pointing last_checkpoint.pt at it and
    pruning older files each fail as one CheckpointError naming the file (not an OSError on a temporary)."""
    folder = Checkpointer(small_disk, 1, CPU)
    for step in (1, 2):
        save_checkpoint({"step": torch.tensor(step)}, folder.step_path(step))
    remount_read_only(small_disk)
    last, oldest = re.escape(str(small_disk / "last_checkpoint.pt")), re.escape(str(folder.step_path(1)))
    with pytest.raises(CheckpointError, match=f"could not update {last}: Read-only"):
        folder._link_last(folder.step_path(2))
    with pytest.raises(CheckpointError, match=f"could not remove the old checkpoint {oldest}: Read-only"):
        folder._prune(2)


def test_closed_stdout_is_not_a_traceback(tiny_run):
    """inference.py piped into `head`: it stops quietly with 141, as a shell reports SIGPIPE."""
    proc = start([sys.executable, "inference.py", "--checkpoint", tiny_run / "ckpt/best_model.pt", "--prompt", "a",
                  "--max-new-tokens", "100000"])
    proc.stdout.read(10)
    proc.stdout.close()  # what `head -c 10` does
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE and "Traceback" not in err, err


@pytest.mark.parametrize("command", [
    ["-m", "scripts.evaluate", "--json", "/proc/no/such.json"],
    pytest.param(["-m", "scripts.export_hf", "--out", "/proc/no-such-export"], marks=pytest.mark.slow),
])
def test_unwritable_output_is_one_line_naming_the_path(tiny_run, command, capfd):
    """An output path that cannot be written is named in one line, exit 2."""
    proc = run_here(capfd, *command, "--checkpoint", tiny_run / "ckpt/best_model.pt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and "/proc/no" in line, line


@pytest.mark.slow
def test_ranks_that_disagree_stop_at_once_with_the_keys(tiny_data, tmp_path):
    """One rank with another optim.lr and checkpoint.every: every rank exits at start naming both keys."""
    overrides = tiny_overrides(tiny_data, tmp_path, **LONG) + ["distributed.timeout_s=300"]
    t0 = time.monotonic()
    proc = run_torchrun(2, "tests/helpers/instrumented_ddp.py", "--device", "cpu", *overrides, timeout=240,
                        env=child_env(RANK1_OVERRIDES="optim.lr=0.5 checkpoint.every=7"))
    assert time.monotonic() - t0 < 120  # nowhere near the collective timeout
    assert proc.returncode != 0
    assert "error: the ranks disagree on checkpoint.every (rank 0: 0, rank 1: 7); optim.lr (rank 0: 0.001, " \
           "rank 1: 0.5)" in proc.stderr, proc.stderr
    # torchrun prints its own traceback for failed workers; none comes from our code
    assert f'File "{ROOT}' not in proc.stderr and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("checkpoints", ["elsewhere", pytest.param("on the same full disk", marks=pytest.mark.slow)])
def test_a_side_writer_on_a_full_disk_saves_first_or_says_what_was_lost(tiny_data, tmp_path, small_disk, checkpoints):
    """The logs (text log, metrics file, TensorBoard) fill their disk mid-run: one line, exit 2, and the
    training done is saved first if the checkpoint folder still takes it, or the line counts what was lost."""
    elsewhere = checkpoints == "elsewhere"
    folder = tmp_path / "ckpt" if elsewhere else small_disk / "ckpt"
    overrides = tiny_overrides(tiny_data, tmp_path, **{**LONG, "checkpoint__every": 2 if elsewhere else 0})
    proc = start_training(*overrides, f"logging.dir={small_disk}/logs", f"checkpoint.dir={folder}")
    wait_for_line(proc, f"saved {folder / 'step_0000002.pt'}" if elsewhere else "step 3/")
    fill(small_disk)
    done = finish(proc, 120)
    err = done.stderr
    assert done.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: could not write the ") and "No space left on device" in err, err
    if elsewhere:
        step = int(re.search(r"saved step (\d+) first", err)[1])
        assert ckpt.load_checkpoint(folder / f"step_{step:07d}.pt")[ckpt.TRAINER]["step"] == step > 3
    else:
        assert re.search(r"a checkpoint could not be saved either \(.*\): the \d+ steps since the start are lost", err)


def test_an_export_into_a_full_disk_leaves_no_half_written_folder(tiny_data, tmp_path, small_disk, capsys):
    from scripts import export_hf

    import train_single

    assert train_single.main(tiny_overrides(tiny_data, tmp_path, train__max_steps=1)) == 0
    fill(small_disk)
    code = export_hf.main(["--checkpoint", str(tmp_path / "ckpt/best_model.pt"), "--out", str(small_disk / "hf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: ") and "No space left" in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]

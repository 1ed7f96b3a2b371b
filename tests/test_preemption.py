"""Preemption and restarts with real signals: SIGTERM/SIGUSR1 save and exit; SIGKILL under torchrun restarts."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, child_env, load_weights, run_script, run_torchrun, tiny_overrides, torchrun_cmd
from utils.trainer import EXIT_PREEMPTED

LONG = dict(train__max_steps=300, train__eval_every=0, train__save_every=0, train__sample_tokens=0)


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env())


def read_until(proc: subprocess.Popen, prefix: str) -> list[str]:
    """Lines of output up to the first that starts with prefix (the event we wait for)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError("process ended before '" + prefix + "':\n" + "".join(lines))


def stopped_step(output: str) -> int:
    line = next(l for l in output.splitlines() if "stop signal received: stopped at step" in l)
    return int(line.split("stopped at step ")[1].split(";")[0])


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_exits_75_and_resume_matches(tiny_data, tmp_path, sig):
    """A signal mid-run: checkpoint at the step reached, exit 75; resuming ends where an uninterrupted run does."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_script("train_single.py", *tiny_overrides(tiny_data, full, **LONG), check=True)
    proc = start([sys.executable, "train_single.py", "--resume", "auto", *tiny_overrides(tiny_data, cut, **LONG)])
    head = read_until(proc, "step 3/")
    proc.send_signal(sig)
    out = "".join(head) + proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED, out
    step = stopped_step(out)
    assert 3 <= step < 300 and (cut / f"ckpt/step_{step:07d}.pt").exists()
    resumed = run_script("train_single.py", "--resume", "auto", *tiny_overrides(tiny_data, cut, **LONG), check=True)
    assert f"at step {step}" in resumed.stdout
    assert_same_weights(full / "ckpt/step_0000300.pt", cut / "ckpt/step_0000300.pt")


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_on_all_ranks_and_resumes(tiny_data, tmp_path):
    """SIGTERM to torchrun reaches both workers; they agree on a step, save once, and resuming matches."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["train_ddp.py", "--device", "cpu", "--resume", "auto"]
    run_torchrun(2, *args, *tiny_overrides(tiny_data, full, **LONG), check=True)
    proc = start(torchrun_cmd(2, *args, *tiny_overrides(tiny_data, cut, **LONG)))
    head = read_until(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    out = "".join(head) + proc.communicate(timeout=120)[0]
    assert proc.returncode != 0  # torchrun reports that it was signalled; the workers exit 75
    step = stopped_step(out)
    assert sorted(p.name for p in (cut / "ckpt").glob("step_*.pt")) == [f"step_{step:07d}.pt"]
    run_torchrun(2, *args, *tiny_overrides(tiny_data, cut, **LONG), check=True)
    assert_same_weights(full / "ckpt/step_0000300.pt", cut / "ckpt/step_0000300.pt")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_sigkill_of_a_worker_restarts_and_finishes(tiny_data, tmp_path):
    """Under torchrun --max-restarts, SIGKILL of one worker restarts the group from the last checkpoint.

    3 restarts, as the README advises: under heavy CPU load a restarted gloo group occasionally fails
    to connect once (a torchrun/gloo start-up race, seen in CI), and the next restart succeeds.
    """
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, run, **{**LONG, "train__save_every": 20})
    proc = start(torchrun_cmd(2, "train_ddp.py", "--device", "cpu", "--resume", "auto", *overrides, max_restarts=3))
    read_until(proc, "saved " + str(run / "ckpt" / "step_0000020.pt"))
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out
    assert "resumed from" in out and "done: 300 steps" in out
    final = torch.load(run / "ckpt/last_checkpoint.pt", weights_only=True)
    assert final["trainer"]["step"] == 300

"""Preemption and restarts with real signals: SIGTERM/SIGUSR1 save and exit; SIGKILL under torchrun restarts."""

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (child_env, children, finish, load_weights, read_until, run_script, run_torchrun, start,
                      tiny_overrides, torchrun_cmd)
from utils.errors import EXIT_PREEMPTED

LONG = dict(train__max_steps=300, train__eval_every=0, train__save_every=0, train__sample_tokens=0)


def stopped_step(output: str) -> int:
    line = next(l for l in output.splitlines() if "stop signal received" in l and "stopped at step" in l)
    return int(line.split("stopped at step ")[1].split(";")[0])


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_exits_75_and_resume_matches(tiny_data, tmp_path, sig):
    """A signal mid-run: checkpoint at the step reached, exit 75; resuming ends where an uninterrupted run does."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_script("train_single.py", *tiny_overrides(tiny_data, full, **LONG), check=True)
    proc = start([sys.executable, "train_single.py", "--resume", "auto", *tiny_overrides(tiny_data, cut, **LONG)],
                 merge_stderr=True)
    head = read_until(proc, "step 3/")
    proc.send_signal(sig)
    out = "".join(head) + finish(proc, timeout=120).stdout
    assert proc.returncode == EXIT_PREEMPTED, out
    step = stopped_step(out)
    assert 3 <= step < 300 and (cut / f"ckpt/step_{step:07d}.pt").exists()
    resumed = run_script("train_single.py", "--resume", "auto", *tiny_overrides(tiny_data, cut, **LONG), check=True)
    assert f"at step {step}" in resumed.stdout
    assert_same_weights(full / "ckpt/step_0000300.pt", cut / "ckpt/step_0000300.pt")


def test_a_signal_before_the_first_log_line_stops_the_run_within_seconds(tiny_data, tmp_path):
    """The stop is polled every ~STOP_POLL_S of training from the first step on, not only from the first log
    line: with a log line due only at step 10^6, a SIGTERM right after start-up still saves and exits 75 at
    once (it used to run on to step 10^6; the test's 60 s would end it)."""
    never = 10 ** 6
    proc = start([sys.executable, "train_single.py", "--resume", "auto", *tiny_overrides(
        tiny_data, tmp_path, **{**LONG, "train__max_steps": never, "train__log_every": never})], merge_stderr=True)
    head = read_until(proc, "no checkpoint in")  # the last start-up line: the stop flag listens from here on
    proc.send_signal(signal.SIGTERM)
    out = "".join(head) + finish(proc, timeout=60).stdout
    assert proc.returncode == EXIT_PREEMPTED, out
    assert (tmp_path / f"ckpt/step_{stopped_step(out):07d}.pt").exists()


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_on_all_ranks_and_resumes(tiny_data, tmp_path):
    """SIGTERM to torchrun reaches both workers; they agree on a step, save once, and resuming matches."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["train_ddp.py", "--device", "cpu", "--resume", "auto"]
    run_torchrun(2, *args, *tiny_overrides(tiny_data, full, **LONG), check=True)
    proc = start(torchrun_cmd(2, *args, *tiny_overrides(tiny_data, cut, **LONG)), merge_stderr=True)
    head = read_until(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    out = "".join(head) + finish(proc, timeout=120).stdout
    assert proc.returncode != 0  # torchrun reports that it was signalled; the workers exit 75
    step = stopped_step(out)
    assert sorted(p.name for p in (cut / "ckpt").glob("step_*.pt")) == [f"step_{step:07d}.pt"]
    run_torchrun(2, *args, *tiny_overrides(tiny_data, cut, **LONG), check=True)
    assert_same_weights(full / "ckpt/step_0000300.pt", cut / "ckpt/step_0000300.pt")


# torchrun SIGKILLs its workers this long after it forwards a SIGTERM (torch's default), the grace the repo's
# launches give them instead (scripts/slurm_common.sh), and a save that outlasts the default
DEFAULT_GRACE_S, GRACE_S, SAVE_S = 30, 120, 40


def torchrun_has_grace() -> bool:
    """torchrun takes --shutdown-timeout / TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch 2.12+); before, 30 s is fixed."""
    from torch.distributed.launcher.api import LaunchConfig

    return "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}


@pytest.mark.slow
@pytest.mark.skipif(not torchrun_has_grace(), reason=f"torchrun of torch {torch.__version__} gives its workers "
                                                     f"a fixed {DEFAULT_GRACE_S} s after SIGTERM (more from 2.12)")
def test_a_save_longer_than_torchruns_default_grace_lands_and_resumes(tiny_data, tmp_path):
    """SIGTERM to torchrun while rank 0's save takes 40 s: with the grace the launches give (the default would
    SIGKILL the workers 30 s in, mid-save), the save lands, and resuming from it matches an uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--device", "cpu", "--resume", "auto"]
    run_torchrun(2, "train_ddp.py", *args, *tiny_overrides(tiny_data, full, **LONG), check=True)
    env = child_env(SLOW_SAVE_S=str(SAVE_S), TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(GRACE_S))
    proc = start(torchrun_cmd(2, "tests/helpers/instrumented_ddp.py", *args, *tiny_overrides(tiny_data, cut, **LONG)),
                 env, merge_stderr=True)
    head = read_until(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    out = "".join(head) + finish(proc, timeout=GRACE_S + 60).stdout
    assert "stop signal received" in out, out  # logged once the save is whole
    step = stopped_step(out)
    assert (cut / f"ckpt/step_{step:07d}.pt").exists()
    resumed = run_torchrun(2, "train_ddp.py", *args, *tiny_overrides(tiny_data, cut, **LONG), check=True)
    assert f"at step {step}" in resumed.stdout
    assert_same_weights(full / "ckpt/step_0000300.pt", cut / "ckpt/step_0000300.pt")


def worker_of_rank(torchrun_pid: int, rank: int) -> int:
    for pid in children(torchrun_pid):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"torchrun {torchrun_pid} has no worker of rank {rank}")


KILLS, EVERY = 10, 4


@pytest.mark.slow
def test_ten_sigkills_in_a_row_each_restart_resumes_and_the_run_finishes(tiny_data, tmp_path):
    """Under torchrun --max-restarts=10, SIGKILL of a worker (rank 1, then rank 0, and so on) right after a
    new checkpoint: every restarted group connects at its first try, resumes, and the run ends exit 0.

    No spare restart: one restarted group that fails to form (torchrun's shared store handing it the
    previous group's peer addresses) uses one up and the run fails. The kill lands a few steps after the
    save it follows when the machine is busy, so each round waits for the restarted group's own
    "resumed from" line; and a resumed group trains on (at ~12 ms a step) while the test, starved on a
    loaded machine, reads its line and sends the next kill, so the run is 25 times longer than ten
    kills need: no group may reach the end before its kill (it would resume at the end, and not save).
    """
    run = tmp_path / "run"
    steps = 25 * (KILLS + 1) * EVERY
    overrides = tiny_overrides(tiny_data, run, **{**LONG, "train__max_steps": steps, "train__save_every": EVERY})
    begin = time.monotonic()
    proc = start(torchrun_cmd(2, "train_ddp.py", "--device", "cpu", "--resume", "auto", *overrides,
                              max_restarts=KILLS), merge_stderr=True)
    out = read_until(proc, "saved " + str(run / "ckpt" / "step_"), timeout=300)  # start-up
    for kill in range(KILLS):
        os.kill(worker_of_rank(proc.pid, (kill + 1) % 2), signal.SIGKILL)
        out += read_until(proc, "resumed from", timeout=120)
        out += read_until(proc, "saved " + str(run / "ckpt" / "step_"), timeout=120)
    result = finish(proc, timeout=120)
    out = "".join(out) + result.stdout
    assert result.returncode == 0, out
    assert out.count("resumed from") == KILLS and f"done: {steps} steps" in out
    assert torch.load(run / "ckpt/last_checkpoint.pt", weights_only=True)["trainer"]["step"] == steps
    print(f"{KILLS} kills and restarts in {time.monotonic() - begin:.0f} s")

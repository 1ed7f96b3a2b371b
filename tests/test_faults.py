"""A fault on one rank is a fault of the job: each fault on one rank or on every rank, under DDP and FSDP on 2
gloo ranks, ends in one of two ways, in bounded time. Either the run goes on and ends with the weights of the
matching unbroken run (fp32, 1e-5), or every rank stops with one line, no traceback, nothing saved lost.
The faults are injected from outside (tests/helpers/fault_rank.py); one process: tests/test_oom.py,
test_health.py, test_fp16.py, test_trust.py, test_preemption.py."""

import time

import pytest
import torch

from conftest import ROOT, child_env, run_torchrun, tiny_overrides
import train_single
from test_health import final_state

HELPER = "tests/helpers/fault_rank.py"
STEPS = 8
BOUND_S = 150  # a run that neither ends nor stops in this long hangs (a healthy one takes about 20 s here)
RUN = dict(train__max_steps=STEPS, train__eval_every=0, train__save_every=0, train__log_every=4, model__dropout=0.0,
           train__grad_accum_steps=2, health__arm_after=2, health__window=4)


def run(tiny_data, folder, strategy, batch=4, env=None, *extra):
    overrides = tiny_overrides(tiny_data, folder, train__batch_size=batch, distributed__strategy=strategy, **RUN)
    started = time.monotonic()
    proc = run_torchrun(2, HELPER, "--device", "cpu", *overrides, *extra, timeout=BOUND_S,
                        env=child_env(**{"FAULT": "none", **(env or {})}))
    return proc, time.monotonic() - started


def final(folder, strategy):
    return final_state(folder / "ckpt" / (f"step_{STEPS:07d}" + ("" if strategy == "fsdp" else ".pt")))


def assert_same_weights(a, b):
    """As tests/test_distributed.py compares 2 ranks with one process (fp32)."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), (name, (a[name] - b[name]).abs().max())


def unbroken(tiny_data, tmp_path):
    """The weights of the unbroken run at the back-off's micro-batch, 2 x 4 on each of 2 ranks: one process at
    4 x 4 trains on the same global batches (tests/test_distributed.py), in a few seconds."""
    folder = tmp_path / "unbroken"
    overrides = tiny_overrides(tiny_data, folder, train__batch_size=4, **{**RUN, "train__grad_accum_steps": 4})
    assert train_single.main(overrides) == 0
    return final(folder, "ddp")


def assert_stopped_in_one_line(proc, seconds, *lines):
    assert proc.returncode != 0 and seconds < BOUND_S
    # torchrun prints its own traceback (ChildFailedError) for a failed worker; no worker prints one
    assert f'File "{ROOT}' not in proc.stdout + proc.stderr, proc.stderr
    for line in lines:
        assert line in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("where", ["one", "every"])
@pytest.mark.parametrize("fault", ["oom_forward", "oom_backward"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_out_of_memory(tiny_data, tmp_path, strategy, fault, where):
    """Micro-batch 4 runs out of memory from step 3 on. DDP, one rank or every rank, and FSDP in the forward of
    every rank: all back off to 2 x 4 together and end with the unbroken 2 x 4 run's weights. FSDP on one rank
    (the other waits in a gather it cannot be released from), or in the backward (which FSDP cannot take up
    again): every rank stops within seconds, naming the micro-batch to continue with."""
    proc, seconds = run(tiny_data, tmp_path, strategy, env=dict(FAULT=fault, FAULT_LIMIT="2",
                                                                   FAULT_RANK="1" if where == "one" else "all"))
    if strategy == "fsdp" and where == "one":
        assert_stopped_in_one_line(proc, seconds, "error: out of memory on rank 1 at step 3 with train.batch_size=4",
                                   "--resume auto train.batch_size=2 train.grad_accum_steps=4",
                                   "error: rank 1 ended before the run finished")
        return
    if strategy == "fsdp" and fault == "oom_backward":
        assert_stopped_in_one_line(proc, seconds, "which the sharded model cannot take up again",
                                   "--resume auto train.batch_size=2 train.grad_accum_steps=4")
        return
    assert proc.returncode == 0, proc.stderr
    assert "health: step 3: oom" in proc.stdout and "train.batch_size=2 x train.grad_accum_steps=4" in proc.stdout
    assert_same_weights(final(tmp_path, strategy), unbroken(tiny_data, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["nonfinite", "spike"])
def test_a_bad_step_on_one_rank_or_every_rank_is_skipped_on_every_rank(tiny_data, tmp_path, fault):
    """Rank 1's loss (or every rank's) is NaN, or 10 times larger, at step 3 only: every rank skips that update
    alike, and DDP (and FSDP, for the NaN) with the fault on one rank end with the weights DDP has with it on
    every rank."""
    weights = {}
    cases = (("ddp", "1"), ("fsdp", "1"), ("ddp", "all")) if fault == "nonfinite" else (("ddp", "1"), ("ddp", "all"))
    for strategy, where in cases:
        folder = tmp_path / f"{strategy}-{where}"
        proc, _ = run(tiny_data, folder, strategy, env=dict(FAULT=fault, FAULT_RANK=where))
        assert proc.returncode == 0, proc.stderr
        assert f"health: step 3: {fault}" in proc.stdout and "): skip" in proc.stdout, proc.stdout
        weights[strategy, where] = final(folder, strategy)
    for case in cases[:-1]:
        assert_same_weights(weights[case], weights["ddp", "all"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy,where", [("ddp", "one"), ("fsdp", "one"), ("fsdp", "every")])
def test_a_failed_compile(tiny_data, tmp_path, strategy, where):
    """torch.compile fails in the warm-up. The ranks decide together: every rank trains eagerly and ends with the
    unbroken run's weights. FSDP with one rank failing inside the sharded forward: the same where the other
    rank gets through its warm-up in time (the gathers it needs may be done), else both stop within seconds,
    the failing rank saying to set train.compile=false."""
    proc, seconds = run(tiny_data, tmp_path, strategy, 4, dict(FAULT="compile", FAULT_RANK="1" if where == "one"
                                                               else "all"), "train.compile=true")
    if strategy == "fsdp" and where == "one" and proc.returncode != 0:  # rank 0 was held in a gather
        assert_stopped_in_one_line(proc, seconds, "error: torch.compile failed on rank 1", "train.compile=false")
        return
    assert proc.returncode == 0, proc.stderr
    assert "torch.compile failed (" in proc.stdout and "training eagerly" in proc.stdout
    assert_same_weights(final(tmp_path, strategy), unbroken(tiny_data, tmp_path))


@pytest.mark.slow
def test_a_side_writer_failing_on_rank_0_stops_every_rank_after_saving(tiny_data, tmp_path):
    """Rank 0's metrics file hits a full disk at step 4: at the next read both ranks save and stop, one line each."""
    proc, seconds = run(tiny_data, tmp_path, "ddp", env=dict(FAULT="side_writer", FAULT_STEP="4"))
    assert_stopped_in_one_line(proc, seconds, "could not write the metrics file", "first: fix the disk")
    saved = int(proc.stderr.split("; saved step ")[1].split()[0])
    assert saved >= 4 and (tmp_path / "ckpt" / f"step_{saved:07d}.pt").is_file()


@pytest.mark.slow
def test_sigterm_on_one_rank_during_a_save_stops_every_rank_and_resumes_exactly(tiny_data, tmp_path):
    """Rank 1 gets SIGTERM while step 4 is being saved: the save completes, every rank stops at the next read
    with exit 75 after saving, and the resumed run ends with the unbroken run's weights (DDP; a sharded resume is
    exact in tests/test_fsdp.py)."""
    strategy = "ddp"
    proc, _ = run(tiny_data, tmp_path, strategy, 2, dict(FAULT="sigterm_in_save", FAULT_STEP="4"),
                  "train.save_every=4", "train.grad_accum_steps=4")
    assert proc.returncode != 0 and "stop signal received" in proc.stdout, proc.stdout + proc.stderr
    proc, _ = run(tiny_data, tmp_path, strategy, 2, None, "train.save_every=4", "train.grad_accum_steps=4",
                  "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(final(tmp_path, strategy), unbroken(tiny_data, tmp_path))

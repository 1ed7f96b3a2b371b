"""Nothing read back between log lines: on a step that writes no log line, the host reads no tensor (on a GPU
each read drains the queue the next step would be launched into) and calls no collective besides the one
all-reduce of the step's loss and flags, on one process and on every DDP rank (tests/helpers/count_syncs.py)."""

import json

import pytest

from conftest import child_env, run_script, run_torchrun, tiny_overrides

HELPER = "tests/helpers/count_syncs.py"
STEPS, LOG_EVERY = 100, 50


def counted(folder, rank):
    record = json.loads((folder / f"rank{rank}.json").read_text())
    return {int(k): v for k, v in record["steps"].items()}, record["read_points"]


def assert_quiet_between_reads(folder, ranks, collectives_per_step):
    for rank in range(ranks):
        steps, read_points = counted(folder, rank)
        # reads only at log steps and at the polls for a stop signal, a few in a run
        assert {LOG_EVERY, STEPS} <= set(read_points) and len(read_points) <= 10, read_points
        quiet = [s for s in range(1, STEPS) if s not in read_points]
        assert len(quiet) >= STEPS - 10
        for s in quiet:
            assert steps.get(s, [0, 0]) == [0, collectives_per_step], (rank, s, steps.get(s))


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_one_process_reads_nothing_between_log_lines(tiny_data, tmp_path, precision):
    """One process, bf16 (and fp16 with its GradScaler): no host read on the steps that log nothing."""
    overrides = tiny_overrides(tiny_data, tmp_path, train__max_steps=STEPS, train__log_every=LOG_EVERY,
                               train__eval_every=0, train__save_every=0, train__precision=precision)
    run_script(HELPER, "--device", "cpu", *overrides, check=True,
               env=child_env(COUNT_SYNCS=str(tmp_path / "counts"), COUNT_SINGLE="1"))
    assert_quiet_between_reads(tmp_path / "counts", 1, 0)


@pytest.mark.slow
def test_every_ddp_rank_reads_nothing_between_log_lines(tiny_data, tmp_path):
    """2 DDP ranks: no host read, and one all-reduce (the loss and the stop and fault flags) per quiet step."""
    overrides = tiny_overrides(tiny_data, tmp_path, train__max_steps=STEPS, train__log_every=LOG_EVERY,
                               train__eval_every=0, train__save_every=0, train__batch_size=2,
                               train__grad_accum_steps=2)
    run_torchrun(2, HELPER, "--device", "cpu", *overrides, check=True, env=child_env(COUNT_SYNCS=str(tmp_path / "c")))
    assert_quiet_between_reads(tmp_path / "c", 2, 1)

"""scripts/gpu_check.sh on a machine without a GPU (its skip mode), and its report, which turns whatever the
steps left behind (a killed pytest, a timed-out or garbled benchmark) into rows of one table, never a crash."""

import json
import subprocess

import pytest
import torch.distributed as dist

from conftest import ROOT, child_env
from models.config import DistributedConfig
from scripts.gpu_check_report import report
from utils.distributed.process_group import process_group
from utils.errors import UserError

BENCH = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "precision": "bf16", "compile": "off", "ms_per_step": 31.5,
         "tokens_per_sec": 520000.0, "mfu": 0.2, "peak_memory_mib": 5000.0}


def write_step(out, step_id, code, log="", seconds=3, limit=60, asked=None):
    (out / f"{step_id}.rc").write_text(f"{code} {seconds} {limit} {limit if asked is None else asked}")
    (out / f"{step_id}.log").write_text(log)


@pytest.mark.slow
def test_gpu_check_without_a_gpu_prints_the_table_of_skips():
    """No GPU: one line saying so, then every check of the table skipped with the reason, exit 0."""
    assert subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=ROOT).returncode == 0
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu_check: skipped: no CUDA device visible"), proc.stdout
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [r[0].lstrip("| ") for r in rows]
    assert {"test_exact_resume_on_gpu", "test_fp16_scaler_through_a_forced_non_finite_step",
            "test_two_processes_on_one_gpu_over_gloo_match_one_process[fsdp]",
            "benchmark: GPT-2 small 16x1024, bf16, compiled"} <= set(names), names
    assert all(r[1] == "skipped" for r in rows) and "Not covered on one GPU: NCCL between ranks" in proc.stdout


def test_timed_out_and_garbled_steps_are_rows_not_crashes(tmp_path, capsys):
    """pytest killed mid-test, a benchmark killed by its timeout, one whose last line is not JSON, one never
    started: each is a row, the run is a failure, and the report itself ends normally."""
    write_step(tmp_path, "data", 0)
    write_step(tmp_path, "tests", 124, "collected 3 items\ntests/test_cuda.py::test_a PASSED [ 33%]\n"
                                       "tests/test_cuda.py::test_b SKIPPED (needs 2 CUDA devices) [ 66%]\n"
                                       "tests/test_cuda.py::test_c ", limit=240)
    write_step(tmp_path, "bench_default", 0, "table\n" + json.dumps(BENCH))
    write_step(tmp_path, "bench_default_compiled", 0, "Traceback ...\nRuntimeError: boom")
    write_step(tmp_path, "bench_gpt2", 124, "", limit=60)
    (tmp_path / "bench_gpt2_compiled.rc").write_text("not-run 0 130")
    assert report(tmp_path, None) == 1
    out = capsys.readouterr().out
    assert "| test_a | ok |" in out and "| test_b | skipped |" in out
    assert "| test_c | FAILED | timed out (the tests' 240 s were spent) |" in out
    assert "| benchmark: default 32x512, bf16, compiled | FAILED | no result line: RuntimeError: boom |" in out
    assert "| benchmark: GPT-2 small 16x1024, bf16 | FAILED | timed out after 60 s" in out
    assert "| benchmark: GPT-2 small 16x1024, bf16, compiled | not run |" in out
    assert "| default 32x512, bf16 | bf16 | off | 31.5 | 520,000 | 20.0% | 5,000 |" in out


def test_a_step_cut_by_the_runs_budget_is_not_a_failure(tmp_path, capsys):
    """Killed at the time the whole run had left, below its own timeout: "cut by the budget", exit 0; a step
    killed at its own timeout is still a failure."""
    write_step(tmp_path, "data", 0)
    write_step(tmp_path, "tests", 124, "tests/test_cuda.py::test_a PASSED [ 50%]\ntests/test_cuda.py::test_b ",
                limit=100, asked=240)
    for step_id in ("bench_default", "bench_default_compiled", "bench_gpt2"):
        write_step(tmp_path, step_id, 0, json.dumps({**BENCH, "compile": "on" if "compiled" in step_id else "off"}))
    write_step(tmp_path, "bench_gpt2_compiled", 137, "compiling", limit=45, asked=130)
    write_step(tmp_path, "plan", 0, json.dumps({"ratio": 1.0, "predicted_mib": 5000.0, "measured_mib": 5000.0}))
    assert report(tmp_path, None) == 0
    out = capsys.readouterr().out
    assert "| test_b | cut by the budget | stopped at 100 s of the tests' 240 s |" in out
    assert "| benchmark: GPT-2 small 16x1024, bf16, compiled | cut by the budget | stopped at 45 s of its 130 s: " \
           "compiling |" in out
    assert "FAILED" not in out and "tests/test_cuda.py" not in out
    assert "no check failed; cut by the budget: test_b, benchmark: GPT-2 small 16x1024, bf16, compiled" in out
    write_step(tmp_path, "bench_gpt2_compiled", 124, "compiling", limit=130, asked=130)
    assert report(tmp_path, None) == 1
    out = capsys.readouterr().out
    assert "| benchmark: GPT-2 small 16x1024, bf16, compiled | FAILED | timed out after 130 s" in out


@pytest.mark.parametrize("mfu, shown", [(None, "n/a"), (0.123, "12.3%")])
def test_a_clean_run_exits_0_with_its_speed_table(tmp_path, capsys, mfu, shown):
    write_step(tmp_path, "data", 0)
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_cuda" name="test_a" time="4.2"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><skipped message="needs 2 CUDA devices"/></testcase>'
        '</testsuite></testsuites>')
    write_step(tmp_path, "tests", 0)
    for step_id in ("bench_default", "bench_default_compiled", "bench_gpt2", "bench_gpt2_compiled"):
        compiled = {**BENCH, "compile": "on" if "compiled" in step_id else "off", "mfu": mfu}
        write_step(tmp_path, step_id, 0, json.dumps(compiled))
    write_step(tmp_path, "plan", 0, "| ddp | 1 | ... |\n" + json.dumps({"ratio": 1.04, "predicted_mib": 5200.0,
                                                                         "measured_mib": 5000.0}))
    assert report(tmp_path, None) == 0
    out = capsys.readouterr().out
    assert "| test_a | ok | 4 s |" in out and "| test_b | skipped | needs 2 CUDA devices |" in out
    assert out.count(f"| {shown} |") == 4 and "every check that ran passed" in out
    assert "| planner: predicted vs measured peak, default 16x512 bf16 | ok | predicted 5,200 MiB, measured 5,000 " \
           "MiB (ratio 1.04) |" in out


def test_a_planner_off_by_more_than_its_tolerance_fails(tmp_path, capsys):
    write_step(tmp_path, "plan", 0, json.dumps({"ratio": 1.3, "predicted_mib": 6500.0, "measured_mib": 5000.0}))
    assert report(tmp_path, None) == 1
    assert "| planner: predicted vs measured peak, default 16x512 bf16 | FAILED |" in capsys.readouterr().out


@pytest.fixture
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("backend", ["auto", "gloo"])
def test_a_named_backend_makes_a_real_group_of_one(one_process, backend):
    """One process (gpu_check's NCCL row runs torchrun with one rank): distributed.backend named makes a real
    group of that backend, freed after the block; auto makes none."""
    with process_group(DistributedConfig(backend=backend), "cpu") as info:
        assert info.world_size == 1 and dist.is_initialized() == (backend != "auto")
        if backend != "auto":
            assert info.backend == dist.get_backend() == backend and dist.get_world_size() == 1
    assert not dist.is_initialized()


def test_nccl_for_one_process_on_a_cpu_is_refused(one_process):
    with pytest.raises(UserError, match="distributed.backend=nccl runs on CUDA devices only"):
        with process_group(DistributedConfig(backend="nccl"), "cpu"):
            pass

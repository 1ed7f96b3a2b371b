"""The real SLURM scripts on a real local SLURM cluster started by scripts/slurm/start_local_slurm.sh, with one
node or two (NODES=2: one slurmd per network namespace): sbatch trains with 2 CPU processes, on one node or one
per node, and SIGUSR1 before the time limit saves, requeues and resumes the job."""

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import ROOT, child_env, tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
NODELIST = {1: "localhost", 2: "node[1-2]"}  # the nodes of a local cluster by its size


def node_count() -> int:
    """Nodes of the running cluster; 0 when none runs."""
    if shutil.which("sinfo") is None:
        return 0
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30)
    return len(nodes.stdout.split()) if nodes.returncode == 0 else 0


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[Callable[[int], None]]:
    """Gives the local cluster a number of nodes (the start script restarts it when that changes). At the end
    the cluster is stopped, or back to its node count if it was running before."""
    if os.geteuid() != 0:
        pytest.skip("starting a local SLURM cluster needs root (scripts/slurm/start_local_slurm.sh)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    was_running = node_count()

    def start(nodes: int) -> None:
        proc = subprocess.run(["bash", ROOT / "scripts/slurm/start_local_slurm.sh"], capture_output=True, text=True,
                              timeout=600, env=dict(os.environ, NODES=str(nodes)))
        assert proc.returncode == 0, f"could not start SLURM with {nodes} node(s):\n{proc.stdout}\n{proc.stderr}"

    yield start
    if was_running:
        start(was_running)
    else:
        subprocess.run(["bash", ROOT / "scripts/slurm/stop_local_slurm.sh"], capture_output=True, timeout=120)


@pytest.fixture
def slurm(local_cluster, nodes: int) -> int:
    """The local cluster with `nodes` nodes (a parameter of the test)."""
    local_cluster(nodes)
    return nodes


@contextmanager
def submitted(script: str, out_dir: Path, *overrides: str, nodes: int = 1) -> Iterator[tuple[str, subprocess.Popen]]:
    """`sbatch --wait` of scripts/<script> on 2 CPU processes, all on one node or one per node:
    (job id, the waiting sbatch). Cancelled on exit."""
    cmd = ["sbatch", "--wait", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=2",
           f"--output={out_dir}/slurm-%j.out", f"scripts/{script}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(NPROC=str(2 // nodes), DEVICE="cpu", PYTHON=sys.executable))
    job = proc.stdout.readline().strip()  # printed at submission; --wait then blocks until the job ends
    try:
        assert job.isdigit(), f"sbatch failed: {proc.communicate(timeout=30)[1]}"
        yield job, proc
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", job], timeout=30)
            proc.kill()
            proc.communicate()


def job_log(out_dir: Path, job: str) -> str:
    path = out_dir / f"slurm-{job}.out"
    return path.read_text() if path.exists() else "(no job log)"


# The 2-node cases run next to each other, so the cluster changes its node count only twice.
@pytest.mark.parametrize("script, nodes", [("train_8gpu.sh", 1), ("train_multinode.sh", 2)])
def test_sbatch_trains_to_the_end(slurm, tiny_data, tmp_path, script):
    """The script under sbatch --wait, pointed at 2 CPU processes: exit 0, a job log, the final checkpoint."""
    with submitted(script, tmp_path, *tiny_overrides(tiny_data, tmp_path), nodes=slurm) as (job, proc):
        proc.communicate(timeout=180)
    log = job_log(tmp_path, job)
    assert proc.returncode == 0, log
    assert f"job {job} (restart 0) on {NODELIST[slurm]}: {slurm} node(s) x {2 // slurm} processes" in log
    assert "x 2 process(es)" in log
    assert "done: 6 steps" in log and "training step exited with code 0" in log
    state = torch.load(tmp_path / "ckpt/step_0000006.pt", weights_only=True)["trainer"]
    assert state["step"] == 6 and state["world_size"] == 2


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the job ended before {path} was written"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.parametrize("script, nodes", [("train_multinode.sh", 2), ("train_8gpu.sh", 1)])
def test_usr1_saves_requeues_and_resumes_to_the_end(slurm, tiny_data, tmp_path, script):
    """USR1 to the batch shell (as --signal=B:USR1@120): save, requeue, resume there, finish; sbatch --wait 0."""
    overrides = tiny_overrides(tiny_data, tmp_path, train__max_steps=300, train__save_every=20, train__keep_last=40,
                               train__eval_every=0, train__log_every=100, train__sample_tokens=0)
    with submitted(script, tmp_path, *overrides, nodes=slurm) as (job, proc):
        wait_for(tmp_path / "ckpt/step_0000020.pt", proc, timeout=120)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
        proc.communicate(timeout=240)
    log = job_log(tmp_path, job)
    assert proc.returncode == 0, log
    step = int(re.search(r"stop signal received[^:]*: stopped at step (\d+)", log).group(1))
    saved = tmp_path / f"ckpt/step_{step:07d}.pt"
    assert 20 <= step < 300 and saved.exists()
    assert f"requeueing job {job}" in log and f"job {job} (restart 1) on {NODELIST[slurm]}" in log
    assert f"resumed from {saved} at step {step}" in log and "done: 300 steps" in log
    assert torch.load(tmp_path / "ckpt/last_checkpoint.pt", weights_only=True)["trainer"]["step"] == 300

"""Shared test helpers: a tiny corpus, tiny-model overrides, and real subprocess launchers."""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

import train_single
from data.prepare_dataset import prepare

# Every line differs a little, so a tiny model has something to learn but can still overfit it.
TINY_TEXT = "".join(f"{i % 7} the quick brown fox {'jumps' if i % 3 else 'leaps'} over the lazy dog {i % 5}.\n"
                    for i in range(600))


def make_dataset(out: Path, text: str = TINY_TEXT, val_fraction: float = 0.1) -> Path:
    prepare(out, [text.encode()], ["tests"], val_fraction)
    return out


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 3-step tiny run (its data in data/, checkpoints in ckpt/), trained once per worker: for tests
    that only read it. A test that changes it works on a copy (shutil.copytree)."""
    run = tmp_path_factory.mktemp("tiny_run")
    train_here(*tiny_overrides(make_dataset(run / "data"), run, train__max_steps=3))
    return run


def train_here(*argv: str) -> None:
    """A training run in this process (its imports are paid): for a run a test reads, not one it watches end."""
    assert train_single.main(list(argv)) == 0, f"training {argv} failed"


def tiny_config(run_dir: Path, data_dir: Path, **extra) -> Path:
    """tiny_overrides as a config file, run_dir/tiny.yaml, for tools that take --config."""
    sections: dict[str, dict] = {}
    for key, value in (o.split("=", 1) for o in tiny_overrides(data_dir, run_dir, **extra)):
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    config = run_dir / "tiny.yaml"
    config.write_text(yaml.safe_dump(sections))
    return config


def tiny_overrides(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A 2-layer, 32-wide model on the tiny corpus, fp32, writing under run_dir."""
    values = {
        "model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.ffn_dim": 64, "model.context_length": 32,
        "data.dir": data_dir, "train.batch_size": 4, "train.max_steps": 6, "train.warmup_steps": 2,
        "train.lr": 1.0e-3, "train.min_lr": 1.0e-4, "train.precision": "fp32", "train.eval_every": 3,
        "train.save_every": 3, "train.log_every": 1, "train.sample_tokens": 8,
        "paths.checkpoint_dir": run_dir / "ckpt", "paths.log_dir": run_dir / "logs",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def child_env(**extra: str | None) -> dict[str, str]:
    """The environment for a child process; a None value removes that variable.

    No GPU is visible to it (CUDA_VISIBLE_DEVICES empty) unless the test asks for one: the CPU suite's
    figures, exact comparisons and "auto" choices are CPU ones even on a machine with a GPU
    (tests/test_cuda.py passes the parent's CUDA_VISIBLE_DEVICES back). It imports this checkout's code
    (PYTHONPATH), whatever checkout was installed in editable mode: a helper run by path from tests/helpers,
    or a module run from another folder, would otherwise find the installed one's."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


_started: list[subprocess.Popen] = []


def start(cmd: list, env: dict | None = None, merge_stderr: bool = False, stdin: bool = False,
          cwd: Path = ROOT) -> subprocess.Popen:
    """Start cmd (from the repository root unless told), text mode, output piped; it and everything under it
    are killed when the test ends (`_kill_started`) or when `finish` times out."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or child_env(), text=True,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE)
    _started.append(proc)
    return proc


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL pid and every process under it. A process group is not enough: torchrun starts each worker
    in a session of its own. Each is stopped first, so none starts another (torchrun restarting a group)
    between the look-up and the kill."""
    stopped: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGSTOP)
            stopped.append(p)
            todo += children(p)
    for p in stopped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _kill_started():
    """Every test: whatever it started and left running (a failed assertion, a hang) dies with it."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.communicate()


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """The CPU suite runs on the CPU where a GPU is visible too (its exact comparisons and "auto" choices
    are CPU ones); only tests marked cuda see the GPU. Child processes: child_env."""
    if request.node.get_closest_marker("cuda") is None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def finish(proc: subprocess.Popen, timeout: float, input: str | None = None) -> subprocess.CompletedProcess:
    """proc's exit code and output; still running after timeout (a hang), it is killed with everything
    under it and the test fails."""
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} still running after {timeout} s: killed\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_until(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> list[str]:
    """Lines of proc's merged output up to the first that starts with prefix (the event a test waits for).
    Not there within timeout: proc is killed with everything under it, and the test fails."""
    lines = []
    timer = threading.Timer(timeout, kill_tree, [proc.pid])
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                return lines
    finally:
        timer.cancel()
    pytest.fail(f"{proc.args} ended, or was killed after {timeout} s, before '{prefix}':\n" + "".join(lines))


def run_script(*args: str | Path, timeout: float = 300, env: dict | None = None, input: str | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repository root."""
    proc = finish(start([sys.executable, *args], env, stdin=input is not None), timeout, input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_here(capfd, *args: str | Path) -> subprocess.CompletedProcess:
    """run_script's answer without a new process: the script's __main__ block runs in this one, whose torch
    import is paid. For what a command answers; how a process ends (signals, streams, paths) needs run_script."""
    module = args[0] == "-m"
    script = ROOT / (str(args[1]).replace(".", "/") + ".py" if module else args[0])
    argv, path = sys.argv, list(sys.path)
    sys.argv = [str(script), *map(str, args[2 if module else 1:])]
    capfd.readouterr()
    try:
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv, sys.path[:] = argv, path
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def torchrun_cmd(nproc: int, *args: str | Path, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", *map(str, args)]


def run_torchrun(nproc: int, *args: str | Path, timeout: float = 300, max_restarts: int = 0,
                 check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = finish(start(torchrun_cmd(nproc, *args, max_restarts=max_restarts), env), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def tb_runs(log_dir: Path) -> list:
    """Every TensorBoard run under log_dir/tensorboard, loaded whole with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for run in sorted((Path(log_dir) / "tensorboard").iterdir()):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        runs.append(acc)
    return runs


def load_weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(autouse=True, scope="session")
def host_cache_dir(tmp_path_factory):
    """Per-host measurements (utils/host_cache.py) go to one folder per test session, not ~/.cache."""
    os.environ["BYTEGPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("host_cache"))


@pytest.hookimpl(tryfirst=True)  # before xdist turns the groups into node ids
def pytest_collection_modifyitems(config, items):
    """Scheduling for pytest-xdist (pytest.ini: --dist loadgroup --no-loadscope-reorder).

    A test that uses a module- or session-scoped fixture of its own file (one shared training run, a
    SLURM cluster) runs on the same worker as the rest of its file, so that fixture is built once. Slow
    tests start first, the README walk-through first of all (the longest single test), so the long ones
    overlap instead of ending the run alone."""
    for item in items:
        module = item.nodeid.split("::")[0]
        shared = (d for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs)
        if any(d.scope in ("module", "session") and d.baseid == module for d in shared):
            item.add_marker(pytest.mark.xdist_group(module))
    items.sort(key=lambda item: ("test_readme" not in item.nodeid, item.get_closest_marker("slow") is None))


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)  # workers share the cores; one thread each keeps them from thrashing

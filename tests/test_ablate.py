"""dev/ablate.py: variants trained per seed at one wall-clock budget and tabulated; bad input is one line
before any run. dev/lr_sweep.py: the grid that follows the best learning rate, and a stopped sweep going on."""

import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import children, finish, run_script, start, tiny_config
from dev.ablate import main as ablate_main
from dev.lr_sweep import MAX_GRID, follow_optimum
from utils.errors import EXIT_INTERRUPTED


@pytest.mark.slow
def test_ablate_prints_a_table_of_fixed_budget_runs(tiny_data, tmp_path):
    """dev/ablate.py times each variant, trains it per seed within the budget, and tabulates val losses."""
    config = tiny_config(tmp_path, tiny_data)
    proc = run_script("-m", "dev.ablate", "--config", config, "--budget", "0.2", "--seeds", "1", "2",
                      "--calibration-steps", "5", "--json", tmp_path / "runs.jsonl",
                      "--variant", "base", "--variant", "rope:model.pos_emb=rope train.max_steps=3", check=True)
    table = [l for l in proc.stdout.splitlines() if l.startswith("| ")]
    assert table[0].startswith("| variant |") and [l.split(" | ")[0] for l in table[1:]] == ["| base", "| rope"]
    assert table[1].endswith("| reference |") and re.search(r"\| [+-]\d\.\d{4}, p = \S+ \((helps|hurts|not shown)\) \|$",
                                                           table[2])
    runs = [json.loads(l) for l in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in runs] == [("base", 1), ("rope", 1), ("base", 2), ("rope", 2)]  # turns
    assert all(r["steps"] >= 1 and 0 < r["val_loss"] < 6 for r in runs)
    assert [r["steps"] for r in runs if r["variant"] == "rope"] == [3, 3]  # a variant's own max_steps is kept


def tree(pid: int) -> list[int]:
    found = children(pid)
    return found + [p for c in found for p in tree(c)]


def running(pid: int) -> bool:
    """Alive, not a zombie waiting for init to reap it."""
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


@pytest.mark.slow
@pytest.mark.parametrize("tool, processes", [
    (["-m", "dev.ablate", "--budget", "600", "--seeds", "1", "--variant", "base:train.max_steps=1000000"], 1),
    (["-m", "dev.record", "--seeds", "1", "--nproc", "2", "--run", "long=CONFIG train.max_steps=1000000"], 3),
])  # dev/record.py under torchrun: the agent and its two workers
def test_a_terminated_tool_leaves_no_training_run_behind(tiny_data, tmp_path, tool, processes):
    """`kill PID` of a dev/ tool while its run trains: the tool exits with one line, and its run is gone too,
    torchrun's workers included (dev/runs.py's run passes the SIGTERM on)."""
    config = str(tiny_config(tmp_path, tiny_data))
    args = [a.replace("CONFIG", config) for a in tool]
    args += ["--config", config] if "dev.ablate" in args else ["--out", str(tmp_path / "record")]
    proc = start([sys.executable, *args])
    deadline = time.monotonic() + 120
    while len(runs := tree(proc.pid)) < processes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(runs) == processes, f"{tool[1]} started {runs}, not {processes} processes"
    proc.send_signal(signal.SIGTERM)
    done = finish(proc, 120)
    left = [p for p in runs if running(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # an orphan is no longer under the tool, where _kill_started looks
    assert not left, f"{len(left)} of the run's processes outlived {tool[1]}"
    assert done.returncode == EXIT_INTERRUPTED and done.stderr.startswith("error: interrupted"), done.stderr


@pytest.mark.parametrize("args, says", [
    (["--variant", "base", "--variant", "typo:model.dimm=64"], "variant 'typo': unknown config key 'model.dimm'"),
    (["--variant", "base", "--budget", "nan"], "argument --budget: must be a number above 0"),
])
def test_ablate_refuses_bad_input_in_one_line_before_any_run(capsys, tmp_path, args, says):
    """A bad variant or budget is one line and exit 2 before the first (long) training run starts (in-process;
    the slow test above runs dev/ablate.py as a process)."""
    assert ablate_main(["--config", "configs/cpu_quickstart.yaml", "--budget", "1", *args,
                        "--json", str(tmp_path / "runs.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "runs.jsonl").exists()


@given(k=st.integers(-6, 6), noise=st.floats(0, 0.4))
def test_the_sweep_follows_the_optimum_to_an_interior_multiplier(k, noise):
    """dev/lr_sweep.py's grid search: on a loss with its best multiplier at 2^k (seeds alike up to noise below
    a grid step's change), it finds 2^k with a worse one on each side, trying each multiplier once; an optimum
    beyond MAX_GRID's reach ends at the grid's edge nearest to it."""
    tried = []

    def losses_at(m: float) -> list[float]:
        tried.append(m)
        return [(math.log2(m) - k) ** 2 + noise * s for s in (0, 1)]

    losses = follow_optimum(losses_at, 1.0)
    grid = sorted(losses)
    best = min(grid, key=lambda m: sum(losses[m]))
    assert len(tried) == len(set(tried)) == len(grid) <= MAX_GRID
    assert all(b == 2 * a for a, b in zip(grid, grid[1:]))
    if abs(k) <= 4:
        assert best == 2.0 ** k and grid[0] < best < grid[-1]
    else:
        assert len(grid) == MAX_GRID and best == (grid[-1] if k > 0 else grid[0])


@pytest.mark.slow
def test_a_stopped_sweep_goes_on_and_writes_its_table(tiny_data, tmp_path):
    """dev/lr_sweep.py run again on a folder with runs.jsonl keeps its runs and trains only the missing ones
    (here the middle multiplier, the other two are worse), then tabulates the width."""
    config = tiny_config(tmp_path, tiny_data)
    out = tmp_path / "sweep"
    out.mkdir()
    kept = [{"width": 32, "multiplier": m, "seed": s, "val_loss": 9.0} for m in (0.5, 2.0) for s in (1, 2)]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    proc = run_script("-m", "dev.lr_sweep", "--config", config, "--out", out, "--widths", "32", "--seeds", "1", "2",
                      "--set", "train.max_steps=2", check=True)
    runs = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert runs[:4] == kept and [(r["multiplier"], r["seed"]) for r in runs[4:]] == [(1.0, 1), (1.0, 2)]
    assert all(0 < r["val_loss"] < 9 for r in runs[4:])
    readme = (out / "README.md").read_text()
    assert "| 32 | 2 | 1 |" in readme and re.search(r"\| 1 \| \d\.\d{4} \| \d\.\d{4} \| \d\.\d{4} \| \*\*best\*\* \|", readme)
    assert proc.stdout == readme + "\n"

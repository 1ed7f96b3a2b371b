"""The error boundary of every entry point, with real processes: a usage error, a closed standard stream,
a Ctrl-C at any moment of start-up and a bug each end in at most one `error:` line and a known exit
code, never a traceback on the terminal."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, finish, make_dataset, run_here, run_script, start, tiny_overrides
from utils.errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_USER

# every file a user runs: the three at the top, the data preparation, and every script with a __main__
ENTRY_POINTS = ["train_single.py", "train_ddp.py", "inference.py", "data/prepare_dataset.py"] + [
    f"scripts/{p.name}" for p in sorted((ROOT / "scripts").glob("*.py")) if "__main__" in p.read_text()]


def one_error_line(err: str) -> str:
    """The single line on stderr, which must be an `error:` line (no traceback, no usage block)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_entry_point_answers_a_usage_error_in_one_line(script, capfd):
    """Each script's own __main__ in this process (a process of each runs in test_layout, by path and as a
    module); the first one as a process of its own too, for the exit status a shell sees."""
    proc = run_script(script, "--no-such-flag", timeout=120) if script == ENTRY_POINTS[0] else \
        run_here(capfd, script, "--no-such-flag")
    assert proc.returncode == EXIT_USER
    assert "--no-such-flag" in one_error_line(proc.stderr) or "required" in proc.stderr


@pytest.fixture
def checkpoint(tiny_run) -> Path:
    return tiny_run / "ckpt/best_model.pt"


def run_shell(command: str, timeout: float = 120):
    """A command line through bash, for the redirections that close a stream (`<&-`, `>&-`)."""
    return finish(start(["bash", "-c", command]), timeout)


@pytest.mark.parametrize("redirect, args, fragment", [
    ("<&-", ["--prompt", "-"], "standard input, which is closed"),
    (">&-", ["--prompt", "ab"], "standard output is closed"),
])
def test_inference_with_a_closed_stream_is_one_line(checkpoint, redirect, args, fragment):
    proc = run_shell(f"{sys.executable} inference.py --checkpoint {checkpoint} {' '.join(args)} "
                     f"--max-new-tokens 3 {redirect}")
    assert proc.returncode == EXIT_USER and fragment in one_error_line(proc.stderr)


def test_a_tool_whose_output_is_its_product_refuses_a_closed_stdout():
    proc = run_shell(f"{sys.executable} -m scripts.plan --world-size 2 >&-")
    assert proc.returncode == EXIT_USER and "standard output is closed" in one_error_line(proc.stderr)


@pytest.mark.slow  # six training runs
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(delay=st.floats(0.0, 2.5))
def test_ctrl_c_at_any_moment_of_start_up_is_at_most_one_line(tmp_path_factory, delay):
    """SIGINT while Python starts, while torch loads, while the run checks its input, or once it trains:
    never a traceback; at most one error line (a run that was already training saves and says so on stdout)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    proc = start([sys.executable, "train_single.py",
                  *tiny_overrides(make_dataset(tmp / "data"), tmp / "run", train__max_steps=2)])
    time.sleep(delay)  # the moment is what varies; there is no event to wait for
    proc.send_signal(signal.SIGINT)
    done = finish(proc, 120)
    if "Traceback" in done.stderr:  # only Python's own start-up (its site module), before any file of ours runs
        assert str(ROOT) not in done.stderr and done.stderr.rstrip().endswith("KeyboardInterrupt"), done.stderr
        return
    assert len(done.stderr.strip().splitlines()) <= 1, done.stderr
    # killed by the signal before Python's handler exists; 130 from the boundary; 75 after a save; 0 if done
    assert done.returncode in (-signal.SIGINT, EXIT_INTERRUPTED, 75, 0), (done.returncode, done.stderr)


def test_a_bug_is_one_line_naming_the_file_that_holds_its_traceback(tmp_path):
    """A helper makes the training step raise an error no code expects (as a bug would)."""
    proc = run_script("tests/helpers/bug_probe.py", *tiny_overrides(make_dataset(tmp_path / "data"), tmp_path / "run"),
                      timeout=120)
    line = one_error_line(proc.stderr)
    assert proc.returncode == EXIT_BUG and "a bug, not your input: ZeroDivisionError" in line
    trace = Path(re.search(r"its traceback is in (\S+);", line)[1])
    try:
        text = trace.read_text()
        assert text.startswith("Traceback") and "planted_bug" in text and "ZeroDivisionError" in text
    finally:
        trace.unlink()


def test_torchruns_error_file_is_never_seen_half_written(tmp_path, monkeypatch):
    """torchrun reads a failed worker's error file the moment the process ends, and its agent dies on a partial
    one (JSONDecodeError, seen once in CI: the agent's SIGTERM ended a rank in the middle of writing its line).
    Torch's own reader, in a loop beside a thread that keeps writing, must only ever find no file or a whole one."""
    import io
    import threading

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from utils.errors import say

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    no_file = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file)).message
    done = threading.Event()

    def write() -> None:
        while not done.is_set():
            say("error: rank 0 ended before the run finished")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(3000):
            failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
            assert failure.message in ("error: rank 0 ended before the run finished", no_file)
    finally:
        done.set()
        writer.join()
    assert [p.name for p in tmp_path.iterdir()] == ["error.json"]  # no temporary left beside it

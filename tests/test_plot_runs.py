"""scripts/plot_runs.py on the event files of a real tiny run and on a nanoGPT log, its refusals, and
that training never loads matplotlib (the plotting dependency is for development only)."""

import struct

import pytest

from conftest import make_dataset, run_here, run_script, tiny_overrides

pytest.importorskip("matplotlib", reason="plotting needs matplotlib (requirements-dev.txt)")

from utils.metrics.curves import read_nanogpt_log, read_runs  # noqa: E402

# training through the real entry point, then a report of whether matplotlib got imported
TRAIN_AND_REPORT = """import runpy, sys
sys.argv = ["train_single.py", *sys.argv[1:]]
try:
    runpy.run_path("train_single.py", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("matplotlib imported:", "matplotlib" in sys.modules)
"""

# the lines nanoGPT's train.py prints (iteration 0 evaluated first, so its time includes the evaluation)
NANOGPT_LOG = """Overriding config with config/train_shakespeare_char.py:
step 0: train loss 4.1676, val loss 4.1649
iter 0: loss 4.1828, time 13293.18ms, mfu -100.00%
iter 1: loss 4.1373, time 888.66ms, mfu -100.00%
iter 2: loss 4.1347, time 656.64ms, mfu -100.00%
step 3: train loss 3.9012, val loss 3.9534
iter 3: loss 3.8800, time 5012.00ms, mfu 0.00%
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 6-step run through train_single.py: (its run folder, what the process printed)."""
    tmp = tmp_path_factory.mktemp("plot")
    data = make_dataset(tmp / "data")
    proc = run_script("-c", TRAIN_AND_REPORT, *tiny_overrides(data, tmp / "run"), check=True)
    return tmp / "run", proc.stdout


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_training_does_not_import_matplotlib(run):
    assert "matplotlib imported: False" in run[1]


def test_plot_of_a_real_run_is_a_png_and_an_svg_of_the_asked_size(run, tmp_path, capfd):
    """Event files of a 6-step run -> PNG of --size x --dpi pixels and an SVG; the curve holds every logged step."""
    log_dir = run[0] / "logs"
    (curve,) = read_runs(str(log_dir))
    assert [p[0] for p in curve.train] == [1, 2, 3, 4, 5, 6] and [p[0] for p in curve.val] == [3, 6]
    assert all(a[1] <= b[1] for a, b in zip(curve.train, curve.train[1:]))  # seconds of training grow
    proc = run_here(capfd, "-m", "scripts.plot_runs", f"tiny={log_dir}", "--x", "both", "--size", "6x3", "--dpi", "50",
                    "--out", tmp_path / "out/curves.png")
    assert "1 run(s)" in proc.stdout
    assert png_size(tmp_path / "out/curves.png") == (300, 150)
    svg = (tmp_path / "out/curves.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "tiny val" in svg


def test_nanogpt_log_gives_its_evaluations_against_seconds_of_training(tmp_path, capfd):
    """Evaluations at their steps; time leaves out the iterations that evaluated, as train/seconds does."""
    (tmp_path / "nanogpt.log").write_text(NANOGPT_LOG)
    curve = read_nanogpt_log(tmp_path / "nanogpt.log", "nanoGPT")
    assert [(s, loss) for s, _, loss in curve.val] == [(0, 4.1649), (3, 3.9534)]
    assert [round(t, 5) for _, t, _ in curve.val] == [0.0, round(0.88866 + 0.65664, 5)]
    assert [loss for _, _, loss in curve.train] == [4.1676, 3.9012]
    assert run_here(capfd, "-m", "scripts.plot_runs", tmp_path / "nanogpt.log", "--x", "time",
                    "--out", tmp_path / "n.png").returncode == 0
    assert png_size(tmp_path / "n.png") == (1000, 400)


@pytest.mark.parametrize("what", ["empty folder", "missing path", "not a log"])
def test_refuses_what_holds_no_runs_with_one_line(tmp_path, what, capfd):
    target = {"empty folder": tmp_path, "missing path": tmp_path / "nope", "not a log": tmp_path / "x.txt"}[what]
    (tmp_path / "x.txt").write_text("hello\n")
    proc = run_here(capfd, "-m", "scripts.plot_runs", target, "--out", tmp_path / "p.png")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "p.png").exists()

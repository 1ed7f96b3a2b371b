"""dev/record.py: real training runs per seed, the record's files, the significance verdicts; bad input
is one line before any run."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import TINY_TEXT, finish, run_script, start, tiny_config
from data.prepare_dataset import prepare
from dev.record import main as record_main


def short_config(tmp_path: Path, data: Path) -> Path:
    return tiny_config(tmp_path, data, train__max_steps=4, train__eval_every=2, train__sample_tokens=0)


@pytest.mark.slow
def test_a_record_holds_every_run_its_curves_and_verdicts(tmp_path):
    """Two runs x two seeds, in turns; the folder has the configs, logs, runs.jsonl, the picture and a README
    whose verdicts follow the rule (a target far above the losses is reached, one far below is not)."""
    data = tmp_path / "data"
    prepare(data, [TINY_TEXT.encode()], ["tests"], 0.1, 0.1)  # with a test split, for --test
    config = short_config(tmp_path, data)
    out = tmp_path / "record"
    proc = run_script("-m", "dev.record", "--out", out, "--seeds", "1", "2", "--device", "cpu", "--test",
                      "--run", f"small={config}", "--run", f"rope={config} model.pos_emb=rope",
                      "--target", "small:9.0", "--target", "rope:0.01", timeout=300, check=True)
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["run"], r["seed"]) for r in runs] == [("small", 1), ("rope", 1), ("small", 2), ("rope", 2)]
    assert all(r["steps"] == 4 and len(r["val_curve"]) == 2 and 0 < r["test_bits_per_byte"] < 9 for r in runs)
    assert runs[0]["val_loss"] != runs[2]["val_loss"]  # the seed reached the run
    assert yaml.safe_load((out / "rope.yaml").read_text())["model"]["pos_emb"] == "rope"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["rope-s1", "rope-s2", "small-s1", "small-s2"]
    assert all(next((out / d).glob("*.metrics.jsonl")).is_file() for d in ("small-s1", "rope-s2"))
    assert (out / "curves.png").stat().st_size > 1000 and (out / "curves.svg").is_file()
    readme = (out / "README.md").read_text()
    assert "python -m dev.record --out" in readme and "| small | " in readme
    assert "**small** against 9.0: " in readme and "(reached)" in readme.split("**small** against 9.0")[1].split("\n")[0]
    assert "(not shown)" in readme.split("**rope** against 0.01")[1].split("\n")[0]
    assert "test bits per byte" in proc.stdout


@pytest.mark.skipif(not os.environ.get("NANOGPT"), reason="set NANOGPT to a nanoGPT checkout to run it")
def test_a_record_side_by_side_with_nanogpt(tmp_path, tiny_data):
    """With a real nanoGPT checkout (Tiny Shakespeare prepared there): its run takes its turn and every run gets
    a time ratio against it."""
    out = tmp_path / "record"
    run_script("-m", "dev.record", "--out", out, "--seeds", "1", "--device", "cpu", "--nanogpt",
               os.environ["NANOGPT"], "--run", f"small={short_config(tmp_path, tiny_data)}", timeout=900, check=True)
    assert "x nanoGPT's (median over seeds" in (out / "README.md").read_text()
    assert (out / "nanogpt-s1.log").read_text().count("iter ") >= 2000


@pytest.mark.parametrize("args, says", [
    (["--run", "a=configs/cpu_quickstart.yaml model.dimm=3"], "--run a: unknown config key 'model.dimm'"),
    (["--run", "configs/cpu_quickstart.yaml"], "--run must look like NAME=CONFIG"),
    (["--run", "a=configs/cpu_quickstart.yaml", "--target", "b:1.5"], "--target b:1.5: NAME must be one of"),
    (["--run", "a=configs/cpu_quickstart.yaml", "--nanogpt", "."], "is not a nanoGPT checkout"),
    (["--run", "a=configs/cpu_quickstart.yaml", "--seeds", "1", "1"], "--seeds must differ"),
])
def test_bad_input_is_one_line_before_any_run(capsys, tmp_path, args, says):
    """In-process: the slow tests above run dev/record.py as a process."""
    assert record_main(["--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_an_existing_record_is_never_overwritten(capsys, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "README.md").write_text("kept")
    assert record_main(["--out", str(tmp_path / "r"), "--run", "a=configs/cpu_quickstart.yaml"]) == 2
    assert "is never overwritten" in capsys.readouterr().err
    assert (tmp_path / "r" / "README.md").read_text() == "kept"


@pytest.mark.slow
def test_gpu_track_trains_for_the_seconds_given_and_prints_its_speed(tmp_path, tiny_data):
    """dev/gpu_track.sh on a CPU: a run planned far longer is stopped by the timeout's SIGTERM (it saves and
    exits), and the one summary line gives its steps, tokens/s and MFU. 20 s: the start-up (Python, torch, the
    checks) must fit with 5 steps on a machine whose cores are busy with other work."""
    proc = run_script_bash("dev/gpu_track.sh", short_config(tmp_path, tiny_data), "20", "--device", "cpu",
                           "train.max_steps=1000000", "train.log_every=5", "eval.every=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"track {tmp_path / 'tiny.yaml'}: ") and " tokens/s | MFU " in line, line
    steps = int(line.split(": ")[1].split(" steps")[0])
    assert 5 <= steps < 1000000


@pytest.mark.parametrize("args", [[], ["configs/cpu_quickstart.yaml"], ["configs/cpu_quickstart.yaml", "3s"]])
def test_gpu_track_usage_is_one_line(args):
    proc = run_script_bash("dev/gpu_track.sh", *args)
    assert proc.returncode == 2 and proc.stderr.startswith("error: usage: ") and proc.stderr.count("\n") == 1


def run_script_bash(script: str, *args) -> subprocess.CompletedProcess:
    return finish(start(["bash", script, *args]), timeout=180)

"""End to end through the real entry points: prepare -> train_single -> inference, TensorBoard reads logs/."""

import json
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml

from conftest import TINY_TEXT, child_env, run_script, tb_runs, tiny_overrides

SCALARS = {"train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Prepare a corpus, train a tiny model on it, and return the run folder."""
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "corpus.txt").write_text(TINY_TEXT)
    run_script("-m", "data.prepare_dataset", "--input", tmp / "corpus.txt", "--out", tmp / "data", check=True)
    proc = run_script("train_single.py", "--config", "configs/cpu_quickstart.yaml",
                      *tiny_overrides(tmp / "data", tmp / "run", train__max_steps=40, eval__every=20,
                                      optim__lr=3e-3, train__log_every=10), check=True)
    return tmp / "run", proc.stdout


def test_training_writes_checkpoints_config_and_log(pipeline):
    """The run leaves best/last checkpoints, the resolved config beside them, and a log starting with it."""
    run, stdout = pipeline
    assert {"best_model.pt", "last_checkpoint.pt", "step_0000040.pt", "config.yaml"} <= \
        {p.name for p in (run / "ckpt").iterdir()}
    saved = yaml.safe_load((run / "ckpt/config.yaml").read_text())
    assert saved["train"]["max_steps"] == 40 and saved["model"]["dim"] == 32
    (log,) = (run / "logs").glob("train_*.log")
    text = log.read_text()
    assert text.startswith("model:") and "= 4 sequences" in text and "done: 40 steps" in text
    assert "x 1 process(es)" in stdout


def test_inference_samples_from_the_checkpoint(pipeline):
    """inference.py streams a continuation of the prompt from best_model.pt, on CPU."""
    run, _ = pipeline
    proc = run_script("inference.py", "--checkpoint", run / "ckpt/best_model.pt", "--prompt", "the quick",
                      "--max-new-tokens", "60", "--seed", "0", check=True)
    assert proc.stdout.startswith("the quick") and len(proc.stdout) >= len("the quick") + 40
    assert "tokens/s" in proc.stderr


def test_tensorboard_event_files_hold_the_scalars(pipeline):
    """TensorBoard's own reader finds every training scalar in logs/tensorboard/."""
    run, _ = pipeline
    (acc,) = tb_runs(run / "logs")
    assert SCALARS <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("val/loss")] == [20, 40]
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses[-1] < losses[0] - 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_command_serves_the_run(pipeline):
    """`tensorboard --logdir logs/` (the README's command) serves our scalars over HTTP."""
    run, _ = pipeline
    exe = shutil.which("tensorboard")
    assert exe, "tensorboard is a dependency and must be on PATH"
    port = free_port()
    proc = subprocess.Popen([exe, "--logdir", str(run / "logs"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline and not tags:
            try:  # the server answers once it has loaded the event files
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.load(r)
            except OSError:
                time.sleep(0.5)
        assert any(SCALARS <= set(run_tags) for run_tags in tags.values()), tags
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_seed_default_config_trains(tiny_data, tmp_path):
    """configs/default_config.yaml (the seed's model, bf16) runs a real step end to end on CPU."""
    proc = run_script("train_single.py", "--config", "configs/default_config.yaml", f"data.dir={tiny_data}",
                      "train.max_steps=1", "train.batch_size=2", "eval.sample_tokens=20",
                      f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.dir={tmp_path / 'logs'}", check=True)
    assert "model: 4,935,680 parameters" in proc.stdout and "done: 1 steps" in proc.stdout
    assert (tmp_path / "ckpt/best_model.pt").is_file()

"""Evaluation (loss, perplexity, bits per byte over every byte, once), scripts/evaluate.py on 1 and
2 processes, what training writes to TensorBoard (read back with TensorBoard's own reader) and to
metrics.jsonl, and the optional Weights & Biases run (offline, read back from its files)."""

import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (ROOT, child_env, make_dataset, run_here, run_script, run_torchrun, tb_runs, tiny_overrides,
                      train_here)
from models.config import ModelConfig
from models.transformer import GPT
from scripts.evaluate import main as evaluate_main
from utils.distributed.process_group import DistInfo
from utils.train.validation import evaluate

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


@torch.no_grad()
def mean_loss_by_hand(model: GPT, data: np.ndarray, T: int) -> tuple[float, int]:
    """Every byte after the first predicted once, from the consecutive T-byte window it falls in."""
    losses = []
    for start in range(0, len(data) - 1, T):
        x = torch.from_numpy(data[start:start + T].astype(np.int64))
        y = torch.from_numpy(data[start + 1:start + T + 1].astype(np.int64))
        logits = model(x[None, : len(y)])[0][0]
        losses.append(F.cross_entropy(logits, y, reduction="none"))
    losses = torch.cat(losses)
    return losses.double().mean().item(), len(losses)


@pytest.mark.parametrize("n_bytes", [2, 16, 17, 100, 161])
def test_evaluate_is_the_mean_per_byte_loss_whatever_the_batch(n_bytes):
    """Loss = mean of per-byte losses over the whole text; independent of batch size; bpb = loss / ln 2."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, context_length=16, pos_emb="rope")).eval()
    data = np.random.default_rng(n_bytes).integers(0, 256, n_bytes, dtype=np.uint8)
    expected, count = mean_loss_by_hand(model, data, 16)
    for batch_size in (1, 3, 64):
        m = evaluate(model, data, 16, batch_size, ONE_PROCESS)
        assert m["bytes"] == count == n_bytes - 1
        assert m["loss"] == pytest.approx(expected, rel=1e-6)
        assert m["bits_per_byte"] == pytest.approx(m["loss"] / math.log(2), rel=1e-12)
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-12)


def test_evaluate_leaves_training_mode_as_it_was():
    """Evaluation switches to eval mode (no dropout) and restores train mode afterwards."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, context_length=8, dropout=0.5))
    data = np.arange(50, dtype=np.uint8)
    a = evaluate(model.train(), data, 8, 4, ONE_PROCESS)
    assert model.training and a["loss"] == pytest.approx(evaluate(model, data, 8, 2, ONE_PROCESS)["loss"], rel=1e-6)


def scalar_events(log_dir):
    (acc,) = tb_runs(log_dir)
    return acc


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """A finished 6-step train_single.py run: (data dir, run dir)."""
    tmp = tmp_path_factory.mktemp("single")
    data = make_dataset(tmp / "data")
    train_here(*tiny_overrides(data, tmp / "run"))
    return data, tmp / "run"


def test_tensorboard_events_hold_scalars_text_samples_and_hparams(single_run):
    """The event files hold the training scalars, a text sample per evaluation and the run's hparams + metrics."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run = single_run
    acc = scalar_events(run / "logs")
    tags = acc.Tags()
    assert {"train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]
    samples = acc.Tensors("sample/text_summary")
    assert [e.step for e in samples] == [3, 6] and all(e.tensor_proto.string_val[0] for e in samples)
    hparams, metrics = {}, set()
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams = {k: v.number_value or v.string_value for k, v in data.session_start_info.hparams.items()}
        if data.HasField("experiment"):
            metrics = {m.name.tag for m in data.experiment.metric_infos}
    assert hparams["model.dim"] == 32 and hparams["train.max_steps"] == 6 and hparams["model.pos_emb"] == "learned"
    assert metrics == {"hparam/val_loss", "hparam/best_val_loss"}
    (final,) = acc.Scalars("hparam/val_loss")
    assert final.value == pytest.approx(acc.Scalars("val/loss")[-1].value)


def jsonl_rows(log_dir):
    (path,) = log_dir.glob("train_*.metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_holds_what_tensorboard_holds(single_run):
    """One JSON line per logged step and per evaluation, with TensorBoard's scalars, steps and wall times."""
    _, run = single_run
    rows = jsonl_rows(run / "logs")
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6, 6]  # log_every=1, evaluations at 3 and 6
    acc = scalar_events(run / "logs")
    tags = [t for t in acc.Tags()["scalars"] if not t.startswith("hparam/")]
    assert {"train/loss", "train/seconds", "val/loss", "val/bits_per_byte"} <= set(tags)
    for tag in tags:
        events = acc.Scalars(tag)
        logged = [r for r in rows if tag in r]
        assert [r["step"] for r in logged] == [e.step for e in events], tag
        for r, e in zip(logged, events):
            # TensorBoard stores float32; JSON has no NaN, so an unknown MFU is null
            assert (r[tag] is None and math.isnan(e.value)) or r[tag] == pytest.approx(e.value, rel=1e-6), tag
            assert r["wall_time"] == pytest.approx(e.wall_time, abs=1.0)


def test_metrics_jsonl_is_valid_to_its_last_line_after_a_kill(tiny_data, tmp_path):
    """Lines are flushed as they are written: SIGKILL mid-run leaves every line complete and parseable."""
    cmd = [sys.executable, "train_single.py", *tiny_overrides(tiny_data, tmp_path, train__max_steps=5000,
                                                              train__eval_every=0, train__save_every=0)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(), start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):  # printed after step 3's metrics were written
                break
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    rows = jsonl_rows(tmp_path / "logs")
    assert [r["step"] for r in rows[:3]] == [1, 2, 3] and all("train/loss" in r for r in rows)


def wandb_records(path):
    """The records of a W&B offline run file: LevelDB-log framing (7-byte headers in 32 KiB blocks) of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, payload = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


@pytest.mark.slow
def test_wandb_offline_run_holds_the_scalars_config_and_samples(single_run, tmp_path):
    """logging.wandb=true with WANDB_MODE=offline: the run file holds TensorBoard's scalars and the config,
    and each evaluation's text sample is saved as HTML."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb); W&B logging is untested here")
    data, tb_run = single_run
    run_script("train_single.py", *tiny_overrides(data, tmp_path, logging__wandb="true"), timeout=600,
               env=child_env(WANDB_MODE="offline", WANDB_SILENT="true"), check=True)
    (run_dir,) = (tmp_path / "logs/wandb").glob("offline-run-*")
    history, config = {}, {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(
                    (record.history.step.num, json.loads(item.value_json)))
        elif kind in ("run", "config"):  # the config comes with the run record, later changes as config records
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    assert config["model"]["dim"] == 32 and config["train"]["max_steps"] == 6 and config["logging"]["wandb"]
    acc = scalar_events(tmp_path / "logs")
    for tag in ("train/loss", "train/lr", "val/loss", "val/bits_per_byte"):
        assert [s for s, _ in history[tag]] == [e.step for e in acc.Scalars(tag)], tag
        assert [v for _, v in history[tag]] == pytest.approx([e.value for e in acc.Scalars(tag)], rel=1e-6)
    samples = sorted((run_dir / "files/media/html").glob("sample_*.html"))
    assert [p.name.split("_")[1] for p in samples] == ["3", "6"] and all("<pre>" in p.read_text() for p in samples)


def test_wandb_missing_stops_before_training_with_one_line(single_run, tmp_path):
    """Without the package: one line saying how to install it, exit 2, no checkpoint and no log."""
    data, _ = single_run
    hide_wandb = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv = ['train_single.py', *sys.argv[1:]]; "
                  "runpy.run_path('train_single.py', run_name='__main__')")
    proc = run_script("-c", hide_wandb, *tiny_overrides(data, tmp_path, logging__wandb="true"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: logging.wandb=true needs the wandb package: pip install wandb (or set logging.wandb=false)"]
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("train_*.log"))


@pytest.mark.slow
def test_a_refused_wandb_login_writes_nothing_and_the_next_start_is_fresh(single_run, tmp_path):
    """W&B online with no API key (a real refusal by wandb.init, in half a second): one line, exit 2, and
    neither config.yaml nor a log, so the same start without W&B is a fresh start, not "holds a run"."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb); W&B logging is untested here")
    data, _ = single_run
    overrides = tiny_overrides(data, tmp_path / "run", train__max_steps=1)
    proc = run_script("train_single.py", *overrides, "logging.wandb=true", "logging.wandb_mode=online",
                      env=child_env(HOME=str(tmp_path), WANDB_API_KEY=None, WANDB_MODE=None))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: wandb.init failed") and \
        len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists()
    run_script("train_single.py", *overrides, check=True)


def test_evaluate_script_reports_the_training_validation_numbers(single_run, tmp_path, capfd):
    """scripts/evaluate.py on the last checkpoint gives training's final val loss, and writes JSON."""
    data, run = single_run
    proc = run_here(capfd, "-m", "scripts.evaluate", "--checkpoint", run / "ckpt/last_checkpoint.pt", "--split", "val",
                    "--json", tmp_path / "m.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["bytes"] == (data / "val-00000.bin").stat().st_size - 1 and result["world_size"] == 1
    assert result["loss"] == pytest.approx(scalar_events(run / "logs").Scalars("val/loss")[-1].value, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
    assert f"bits per byte {result['bits_per_byte']:.6f}" in proc.stdout
    text = run_here(capfd, "-m", "scripts.evaluate", "--checkpoint", run / "ckpt/last_checkpoint.pt",
                    "--text-file", data / "val-00000.bin", "--batch-size", "1", "--json", tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["loss"] == pytest.approx(result["loss"], rel=1e-6), text.stdout


def run_on_pty(args: list, env: dict) -> str:
    """Run `python args` with stdout and stderr on a pseudo-terminal; everything it wrote there."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(master)
    return out.decode(errors="replace")


@pytest.mark.slow
def test_evaluation_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(single_run, tmp_path):
    """On a pty: a tqdm bar (carriage returns) and no log lines; redirected: plain lines and no bar."""
    _, run = single_run
    args = ["-m", "scripts.evaluate", "--checkpoint", run / "ckpt/last_checkpoint.pt", "--batch-size", "2"]
    env = child_env(BYTEGPT_PROGRESS_INTERVAL="0")  # a line at every batch, so a tiny split shows some
    on_tty = run_on_pty(args, env)
    assert "evaluate:" in on_tty and "\r" in on_tty and "s elapsed" not in on_tty
    logged = run_script(*args, env=env, check=True).stderr
    lines = [l for l in logged.splitlines() if l.startswith("evaluate: ")]
    assert lines and all(re.search(r"B/s, \d+ s elapsed, ETA \d+ s$", l) for l in lines), lines
    assert "\r" not in logged and "%|" not in logged
    assert "100%" in lines[-1]


def test_evaluate_script_refuses_a_text_too_short(capsys, single_run, tmp_path):
    """A one-byte file has nothing to predict: one error line, exit 2 (in-process; the tests above run the
    script as a process)."""
    _, run = single_run
    (tmp_path / "one.txt").write_bytes(b"x")
    assert evaluate_main(["--checkpoint", str(run / "ckpt/best_model.pt"), "--text-file", str(tmp_path / "one.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "at least 2" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(tmp_path):
    """2 ranks give 1 process's numbers: training's validation (even with a rank that has no window) and evaluate.py."""
    data = make_dataset(tmp_path / "data")
    # 20 bytes = one 19-byte window: rank 1 evaluates nothing and must still join the reduction
    run_torchrun(2, "train_ddp.py", "--device", "cpu",
                 *tiny_overrides(data, tmp_path / "run", model__pos_emb="rope", train__eval_max_bytes=20,
                                 distributed__timeout_s=60), timeout=180, check=True)
    checkpoint = tmp_path / "run/ckpt/last_checkpoint.pt"
    single = run_script("-m", "scripts.evaluate", "--checkpoint", checkpoint, "--max-bytes", "20",
                        "--json", tmp_path / "one.json", check=True)
    logged = scalar_events(tmp_path / "run/logs").Scalars("val/loss")[-1].value
    assert json.loads((tmp_path / "one.json").read_text())["loss"] == pytest.approx(logged, rel=1e-6), single.stdout
    # 91 windows of 32 bytes in batches of 5: 46 + 45 windows, so the ranks run unequal batch counts
    run_torchrun(2, "-m", "scripts.evaluate", "--checkpoint", checkpoint, "--device", "cpu", "--batch-size", "5",
                 "--max-bytes", "2900", "--json", tmp_path / "two.json", check=True)
    run_script("-m", "scripts.evaluate", "--checkpoint", checkpoint, "--max-bytes", "2900", "--json",
               tmp_path / "one.json", check=True)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and two["bytes"] == one["bytes"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)

"""What the research tools share: a training run in a scratch folder, its metrics.jsonl (utils/metrics/sinks.py
writes it) read back at full precision (the figures dev/ablate.py, dev/lr_sweep.py, dev/record.py and
dev/gpu_track.sh compare), and the machine a record names."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
from pathlib import Path

import torch

from utils.device import device_name
from utils.errors import UserError, child_error

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(log_dir: Path) -> list[dict[str, float]]:
    """The rows of the one run's metrics.jsonl in log_dir (logging.dir), in the order they were logged."""
    found = sorted(Path(log_dir).glob("*.metrics.jsonl"))
    if not found:
        raise UserError(f"{log_dir} holds no *.metrics.jsonl: the run stopped before its logger started")
    return [json.loads(line) for line in found[-1].read_text().splitlines()]


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for a tool's child (a training run, torchrun, nanoGPT). `kill PID` of the tool ends the
    child too (Ctrl-C reaches the whole process group anyway): SIGTERM is passed on, so a run stops as it
    would on a preemption and torchrun passes it to its workers; a second one kills the child. The tool then
    stops as if interrupted."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    terminated = []

    def pass_on(signum: int, frame) -> None:
        (proc.kill if terminated else proc.terminate)()
        terminated.append(signum)

    with subprocess.Popen(list(map(str, cmd)), text=True, **kwargs) as proc:
        previous = signal.signal(signal.SIGTERM, pass_on)
        try:
            out, err = proc.communicate()
        except BaseException:  # an interrupt of this process alone (kill -INT PID): the child is not left behind
            proc.kill()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    if terminated:
        raise KeyboardInterrupt
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train(config: str, overrides: list[str], tmp: Path) -> list[dict[str, float]]:
    """Run train_single.py writing under tmp; the rows of its metrics.jsonl."""
    proc = run([sys.executable, "train_single.py", "--config", config, *overrides, f"checkpoint.dir={tmp / 'ckpt'}",
                f"logging.dir={tmp / 'logs'}"], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        raise UserError(f"training with {' '.join(overrides) or 'the config alone'} failed: {child_error(proc)}")
    return read_metrics(tmp / "logs")


def machine(device: str) -> dict:
    used = torch.device("cuda") if device != "cpu" and torch.cuda.is_available() else torch.device("cpu")
    return {"device": device_name(used), "cpu": device_name(torch.device("cpu")), "torch": torch.__version__,
            "python": platform.python_version(), "gpus": torch.cuda.device_count()}

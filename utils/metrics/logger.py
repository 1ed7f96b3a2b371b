"""Measuring a run: the throughput meter (time inside optimizer steps, tokens/s, MFU, ETA) and the
logger that writes console lines, logs/train_<run>.log, logs/train_<run>.metrics.jsonl, TensorBoard
events and optionally Weights & Biases (rank 0 only; the sinks are in utils/metrics/sinks.py).

A side writer that fails (a full disk, a vanished folder, W&B's own errors) is switched off and its
failure kept in `failure`, one line naming the file; the trainer reads it after the step, saves a
checkpoint with every rank and stops with that line. It never surfaces as a thread's traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Callable


from models.config import LoggingConfig
from utils.errors import UserError, describe_os_error
from utils.metrics.flops import model_flops_utilization
from utils.metrics.sinks import JsonlSink, WandbSink, require_wandb


def format_seconds(seconds: float) -> str:
    """'1:02:03' (hours, minutes, seconds); '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class ThroughputMeter:
    """Training time and throughput: only time inside optimizer steps counts (no evaluation,
    saving or start-up), tokens/s is over each log interval, the ETA is from this process's pace.
    Steps are timed in laps, from `start` to the read that ends them (Trainer.read): the read waits for
    the device, so the time is the device's, and no step has to wait for it on its own."""

    def __init__(self, tokens_per_step: int, total_steps: int, flops_per_token: float, peak: float | None) -> None:
        self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
        self.flops_per_token, self.peak = flops_per_token, peak
        self.train_seconds = 0.0  # restored on resume, so it counts the whole run
        self.started = self._lap_start = time.perf_counter()
        self._steps = 0  # steps timed by this process
        self._seconds = 0.0  # their time
        self._interval_steps, self._interval_seconds = 0, 0.0

    def start(self) -> None:
        """Training resumes now (after start-up, an evaluation or a save)."""
        self._lap_start = time.perf_counter()

    def lap(self, steps: int) -> None:
        """`steps` steps ended now, their results read back from the device."""
        now = time.perf_counter()
        dt, self._lap_start = now - self._lap_start, now
        self.train_seconds += dt
        self._seconds += dt
        self._interval_seconds += dt
        self._steps += steps
        self._interval_steps += steps

    def tokens_per_sec(self) -> float:
        """Over the steps since the last call."""
        rate = self._interval_steps * self.tokens_per_step / max(self._interval_seconds, 1e-9)
        self._interval_steps, self._interval_seconds = 0, 0.0
        return rate

    def mfu(self, tokens_per_sec_per_device: float) -> float:
        """Model FLOPs utilisation of one device; NaN when its peak is unknown."""
        mfu = model_flops_utilization(tokens_per_sec_per_device, self.flops_per_token, self.peak)
        return math.nan if mfu is None else mfu

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self, step: int) -> float:
        """Seconds of training left, at this process's pace so far (evaluation not included)."""
        return (self.total_steps - step) * self._seconds / self._steps if self._steps else math.nan


class MetricsLogger:
    """Console + log file + metrics.jsonl + TensorBoard (+ W&B) on the main rank; a no-op elsewhere.

    `config` is the run's whole config as a dict, for W&B's run config.
    """

    def __init__(self, log_dir: str | Path, is_main: bool, run_name: str | None = None,
                 logging: LoggingConfig | None = None, config: dict | None = None) -> None:
        logging = logging or LoggingConfig()
        require_wandb(logging)  # before anything is written, on every rank
        self.is_main = is_main
        self.failure: str | None = None  # the first side write that failed, as one line
        self._off: set[str] = set()  # the writers switched off by a failure
        self.run_name = run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.file = self.tb = self.path = self.tb_dir = self.jsonl = self.wandb = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = Path(log_dir)
            tb_root = log_dir / "tensorboard"
            created = [d for d in (tb_root, log_dir, *log_dir.parents) if not d.exists()]  # innermost first
            tb_root.mkdir(parents=True, exist_ok=True)
            try:  # creating its TensorBoard folder claims the run's name, atomically: two runs started in the
                (tb_root / self.run_name).mkdir()  # same second into one folder get two names
            except FileExistsError:
                self.run_name += f"-{os.getpid()}"
                (tb_root / self.run_name).mkdir()
            created.insert(0, tb_root / self.run_name)
            if logging.wandb:  # before any file of ours: a refused W&B run (a login) leaves the folder as it was
                try:
                    self.wandb = WandbSink(logging, config or {}, self.run_name, log_dir)
                except UserError:
                    with contextlib.suppress(OSError):  # a folder W&B wrote into stays
                        for folder in created:
                            folder.rmdir()
                    raise
            self.path = log_dir / f"train_{self.run_name}.log"
            self.file = open(self.path, "a", buffering=1)
            self.tb_dir = log_dir / "tensorboard" / self.run_name
            self.tb = SummaryWriter(str(self.tb_dir))
            self.jsonl = JsonlSink(log_dir / f"train_{self.run_name}.metrics.jsonl")

    def _write(self, writer: str, write: Callable[[], object]) -> None:
        """One side write on rank 0; the first failure switches that writer off and is kept as `failure`."""
        if not self.is_main or writer in self._off or (writer == "W&B" and self.wandb is None):
            return
        try:
            write()
        except Exception as e:  # OSError from the files and TensorBoard's writer thread; W&B raises its own types
            self._off.add(writer)
            why = describe_os_error(e) if isinstance(e, OSError) else f"{type(e).__name__}: {str(e)[:160]}"
            self.failure = self.failure or f"could not write the {writer} ({why})"

    def info(self, msg: str) -> None:
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(msg)
            self.file_only(msg)

    def file_only(self, msg: str) -> None:
        """For the log file alone (the full resolved config), not the console."""
        self._write("text log", lambda: self.file.write(msg + "\n"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write("TensorBoard events", lambda: [self.tb.add_scalar(k, v, step) for k, v in values.items()])
        self._write("metrics file", lambda: self.jsonl.scalars(step, values))
        self._write("W&B", lambda: self.wandb.scalars(step, values))

    def text(self, tag: str, text: str, step: int) -> None:
        # TensorBoard renders markdown; a code block keeps the sample's own line breaks
        self._write("TensorBoard events", lambda: self.tb.add_text(tag, "```\n" + text + "\n```", step))
        self._write("W&B", lambda: self.wandb.text(tag, text, step))

    def event(self, step: int, row: dict[str, object], tag: str, line: str) -> None:
        """An event (run health): its row in metrics.jsonl, a mark and its line in TensorBoard."""
        self._write("metrics file", lambda: self.jsonl.row(step, row))
        # a mark on the timeline at the event's step, and its line
        self._write("TensorBoard events", lambda: (self.tb.add_scalar(f"{tag}/event", 1.0, step),
                                                   self.tb.add_text(tag, line, step)))
        self._write("W&B", lambda: self.wandb.text(tag, line, step))

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        self._write("TensorBoard events", lambda: self.tb.add_hparams(hparams, metrics, run_name="."))

    def close(self) -> None:
        self._write("TensorBoard events", lambda: self.tb.close())
        self._write("metrics file", lambda: self.jsonl.close())
        self._write("text log", lambda: self.file.close())
        self._write("W&B", lambda: self.wandb.close())

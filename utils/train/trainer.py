"""The only training loop, shared by train_single.py and train_ddp.py (wired by utils/train/run.py).

`Trainer` receives everything already built and runs optimizer steps: log, validate and save when
due, stop when asked (a signal, or train.stop_at_step). Vocabulary: `step` is an optimizer step;
`micro_step` indexes gradient accumulation within it.
"""

from __future__ import annotations

import math
import sys
import warnings
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.nn as nn

from data.dataset import BatchPlan
from models.config import Config
from models.config_loader import config_to_dict
from utils.checkpoint import format as ckpt
from utils.checkpoint.folder import Checkpointer
from utils.checkpoint.format import CheckpointError
from utils.distributed.process_group import (DistInfo, all_reduce_mean, broadcast_object, gather_object, maybe_no_sync,
                                            unwrap)
from utils.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from utils.metrics.logger import MetricsLogger, ThroughputMeter, format_seconds
from utils.distributed.parallel import clip_grad_norm
from utils.train.guard import HealthGuard
from utils.train.stopping import StopFlag
from utils.train.validation import Validator


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class Trainer:
    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 autocast: AbstractContextManager, plan: BatchPlan, validator: Validator,
                 checkpointer: Checkpointer, logger: MetricsLogger, meter: ThroughputMeter, stop: StopFlag,
                 info: DistInfo, config: Config) -> None:
        self.model, self.raw = model, unwrap(model)
        self.optimizer, self.scheduler, self.scaler, self.autocast = optimizer, scheduler, scaler, autocast
        self.plan, self.validator, self.checkpointer, self.stop = plan, validator, checkpointer, stop
        self.log, self.meter = logger, meter
        self.info, self.cfg = info, config.train
        self.eval_every, self.save_every = config.eval.every, config.checkpoint.every
        self.run_config = config_to_dict(config)  # stored in every checkpoint, so inference needs nothing else
        self.step = 0
        self.best_val_loss = math.inf
        self.skipped_steps = 0
        self._losses: list[float] = []
        self.guard = HealthGuard(self, config.health)

    # -- state ---------------------------------------------------------------------------------
    @property
    def data_step(self) -> int:
        """The step whose windows this step trains on: ahead of `step` by the windows rollbacks skipped."""
        return self.step + self.guard.data_offset

    def state_dict(self) -> dict:
        epoch, step_in_epoch = self.plan.position(self.data_step)
        return {"step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch, "world_size": self.info.world_size,
                "best_val_loss": self.best_val_loss, "tokens_seen": self.step * self.meter.tokens_per_step,
                "skipped_steps": self.skipped_steps, "train_seconds": self.meter.train_seconds,
                "health": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_val_loss = state["step"], state["best_val_loss"]
        self.skipped_steps = state["skipped_steps"]
        self.meter.train_seconds = state["train_seconds"]
        if "health" in state:  # absent in checkpoints from before run health
            self.guard.load_state_dict(state["health"])

    def extra_state(self) -> dict:
        """Everything but the weights and optimizer state needed to continue exactly; collective
        (every rank contributes its RNG)."""
        return {ckpt.SCHEDULER: self.scheduler.state_dict(), ckpt.SCALER: self.scaler.state_dict(),
                ckpt.TRAINER: self.state_dict(), ckpt.RNG: gather_object(ckpt.rng_state(), self.info),
                ckpt.CONFIG: self.run_config, ckpt.FORMAT: ckpt.FORMAT_VERSION}

    def restore(self, state: dict, source: str) -> None:
        """Continue from a loaded checkpoint (already checked to fit this run)."""
        self.checkpointer.restore(Path(source), state, self.raw, self.optimizer)
        self.scheduler.load_state_dict(state[ckpt.SCHEDULER])
        if state[ckpt.SCALER] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state[ckpt.SCALER])
        else:  # a run trained without loss scaling (bf16, fp32) continued in fp16
            self.log.info("the checkpoint has no GradScaler state (trained without fp16); fp16 starts a fresh one")
        self.load_state_dict(state[ckpt.TRAINER])
        rngs = state[ckpt.RNG]
        if len(rngs) != self.info.world_size:
            self.log.info(f"warning: checkpoint saved by {len(rngs)} processes, resuming on {self.info.world_size}; "
                          "the data order is unchanged but dropout noise will differ from an uninterrupted run")
        ckpt.set_rng_state(rngs[self.info.rank % len(rngs)])
        self.guard.resumed()
        self.log.info(f"resumed from {source} at step {self.step}")

    # -- one optimizer step --------------------------------------------------------------------
    def accumulate(self) -> torch.Tensor:
        """Forward/backward over all micro-steps; the summed loss. Backs off on out-of-memory."""
        while True:
            try:
                return self._micro_steps()
            except torch.OutOfMemoryError:
                pass  # handled outside the except block, whose traceback still holds the step's activations
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.out_of_memory()

    def _micro_steps(self) -> torch.Tensor:
        accum = self.cfg.grad_accum_steps
        self.model.train()
        loss_sum = torch.zeros((), device=self.info.device)
        x, y = self.plan.batch(self.data_step, 0, self.info.device)
        for micro_step in range(accum):
            with maybe_no_sync(self.model, sync=micro_step == accum - 1):
                with self.autocast:
                    _, loss = self.model(x, y)
                if micro_step + 1 < accum:  # gather the next batch while the device works
                    x, y = self.plan.batch(self.data_step, micro_step + 1, self.info.device)
                # divide so the accumulated gradient is the mean over the global batch
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
        return loss_sum

    def train_step(self) -> tuple[float, float, bool]:
        """Forward/backward over all micro-steps, judge the step, then one update (or none).
        Returns (loss, grad norm, applied), the loss and norm averaged over ranks.

        One host sync per optimizer step, to read the loss and norm the health guard judges.
        """
        loss_sum = self.accumulate()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = clip_grad_norm(self.raw, clip)
        # one all-reduce: every rank judges the same numbers, so all reach the same verdict
        stats = all_reduce_mean(torch.stack([loss_sum / self.cfg.grad_accum_steps, norm.float()]), self.info)
        loss_value, norm_value = stats.tolist()
        applied = False
        if self.guard.judge(loss_value, norm_value):
            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)  # fp16: the scaler itself skips steps with inf gradients
            applied = scale_before is None or self.scaler.get_scale() >= scale_before
        self.scaler.update()  # every step, applied or not, so the next unscale_ starts afresh
        self.optimizer.zero_grad(set_to_none=True)
        if not self.guard.settle():  # rolled back: the state is the snapshot's, nothing more to do
            return loss_value, norm_value, False
        with warnings.catch_warnings():  # a skipped first update (fp16 overflow, health) is not a misuse
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.step += 1
        self.skipped_steps += not applied
        self.guard.step_done()
        return loss_value, norm_value, applied

    # -- what the loop does when due -----------------------------------------------------------
    def log_progress(self, norm: float) -> None:
        """One line (and TensorBoard scalars) for the steps since the last one; collective."""
        mean_loss = sum(self._losses) / len(self._losses)  # each already the mean over ranks
        self._losses = []
        tok_s = self.meter.tokens_per_sec()
        mfu = self.meter.mfu(tok_s / self.info.world_size)
        lr = self.last_lr
        self.log.scalars(self.step, {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": norm,
                                     "train/tokens_per_sec": tok_s, "train/mfu": mfu,
                                     "train/skipped_steps": self.skipped_steps,
                                     "train/seconds": self.meter.train_seconds})
        self.log.info(f"step {self.step}/{self.cfg.max_steps} | loss {mean_loss:.4f} | lr {lr:.3e} | "
                      f"grad norm {norm:.3f} | {tok_s:,.0f} tok/s | MFU {mfu:.1%} | skipped {self.skipped_steps} | "
                      f"elapsed {format_seconds(self.meter.elapsed())} | eta {format_seconds(self.meter.eta(self.step))}")

    def validate(self) -> dict[str, float]:
        metrics = self.validator.evaluate()
        self.log.info(f"step {self.step}: val loss {metrics['loss']:.4f}, bits/byte {metrics['bits_per_byte']:.4f}, "
                      f"perplexity {metrics['perplexity']:.2f}, after {self.meter.train_seconds:.1f} s of training")
        self.log.scalars(self.step, {"val/loss": metrics["loss"], "val/bits_per_byte": metrics["bits_per_byte"],
                                     "val/perplexity": metrics["perplexity"]})
        if self.validator.cfg.sample_tokens:
            self.log.text("sample", self.validator.sample(), self.step)
        if metrics["loss"] < self.best_val_loss:
            self.best_val_loss = metrics["loss"]
            self.log.info(f"saved {self.checkpointer.save_best(self.raw, self.optimizer, self.extra_state())}")
        return metrics

    def save(self) -> None:
        self.log.info(f"saved {self.checkpointer.save(self.raw, self.optimizer, self.extra_state(), self.step)}")
        self.guard.take_snapshot()

    def stop_for_side_writer(self, failure: str) -> None:
        """A log, metrics or W&B write failed: keep the training done since the last checkpoint if the disk
        still takes one, then stop with one line either way."""
        saved = self.checkpointer.step_files()
        last = saved[-1][0] if saved else None
        try:
            self.save()
        except CheckpointError as e:
            since = f"since step {last}" if last is not None else "since the start"
            raise UserError(f"{failure}; a checkpoint could not be saved either ({e}): the {self.step - (last or 0)} "
                            f"steps {since} are lost; fix the disk, then continue with --resume auto") from None
        raise UserError(f"{failure}; saved step {self.step} first: fix the disk or folder, then continue with "
                        f"--resume auto")

    def stop_reason(self) -> str | None:
        """Why to stop after this step, the same on every rank; None to go on. Collective. A side writer's
        failure does not return: it saves if it can and raises (stop_for_side_writer)."""
        if self.stop.should_stop(self.info, failing=self.log.failure is not None):
            failure = broadcast_object(self.log.failure, self.info)  # rank 0 writes the logs
            if failure:
                self.stop_for_side_writer(failure)  # raises, after saving if it can
            return f"stop signal received ({self.stop.received or 'on another rank'})"
        if self.step == self.cfg.stop_at_step:
            return f"train.stop_at_step={self.cfg.stop_at_step} reached"
        return None

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to train.max_steps or a stop; returns the process exit code."""
        from tqdm import tqdm

        bar = tqdm(total=self.cfg.max_steps, initial=self.step, dynamic_ncols=True, leave=False,
                   disable=not (self.info.is_main and sys.stderr.isatty()))  # no bar in log files
        val: dict[str, float] = {}
        self.guard.take_snapshot()
        while self.step < self.cfg.max_steps:
            self.last_lr = self.scheduler.get_last_lr()[-1]  # the AdamW group's rate for this step
            with self.meter.step():
                loss, norm, _ = self.train_step()
            self._losses.append(loss)
            bar.update(1)
            last = self.step == self.cfg.max_steps
            if due(self.step, self.cfg.log_every) or last:
                self.log_progress(norm)
            if due(self.step, self.eval_every) or last:
                val = self.validate()
            stop = self.stop_reason()
            if due(self.step, self.save_every) or last or stop:
                self.save()
            if stop:
                bar.close()
                self.log.info(self.guard.summary())
                self.log.info(f"{stop}: stopped at step {self.step}; continue with --resume auto")
                return EXIT_PREEMPTED if stop.startswith("stop signal") else EXIT_OK
        bar.close()
        hparams = {f"{section}.{k}": v for section in ("model", "train", "optim", "schedule")
                   for k, v in self.run_config[section].items()}
        self.log.hparams(hparams, {"hparam/val_loss": val.get("loss", math.nan),
                                   "hparam/best_val_loss": self.best_val_loss})
        self.log.info(self.guard.summary())
        self.log.info(f"done: {self.step} steps in {self.meter.train_seconds:.1f} s of training, "
                      f"best val loss {self.best_val_loss:.4f}")
        return EXIT_OK

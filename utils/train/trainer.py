"""The only training loop, shared by train_single.py and train_ddp.py (wired by utils/train/run.py).

`Trainer` receives everything already built and runs optimizer steps: log, validate and save when
due, stop when asked (a signal, or train.stop_at_step). Vocabulary: `step` is an optimizer step;
`micro_step` indexes gradient accumulation within it.

A step reads nothing back to the host: on a GPU every read waits for all the queued work, so the CPU
could not queue the next step while this one runs. Its loss, grad norm and health verdict stay on the
device, and its update is masked there when the verdict, an fp16 overflow or an out-of-memory on any
rank says so (`advance`). The host reads the steps since the last read at a read point (`read`): a
step that logs, validates, saves or ends the run, and every `poll` steps (about STOP_POLL_S of
training), so that a stop signal is acted on soon. Every rank reads the same all-reduced values at
the same steps, so all act alike. health.action=rollback or stop reads every step: they act before
the next step runs.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from data.dataset import BatchPlan
from models.config import Config
from models.config_loader import config_to_dict
from utils.checkpoint import format as ckpt
from utils.checkpoint.folder import Checkpointer
from utils.checkpoint.format import CheckpointError
from utils.distributed.parallel import clip_grad_norm, finish_reduction
from utils.distributed.process_group import (DistInfo, agree_by_store, all_reduce_sum, broadcast_object,
                                            gather_object, maybe_no_sync, unwrap)
from utils.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from utils.metrics.logger import MetricsLogger, ThroughputMeter, format_seconds
from utils.train.guard import GO, ROLLBACK, STOP, HealthGuard
from utils.train.health import RunUnhealthy
from utils.train.oom import dump_memory_snapshot, free_memory, smaller_micro_batch, start_memory_history
from utils.train.optim import step_unless
from utils.train.rollback import Snapshot
from utils.train.stopping import StopFlag
from utils.train.validation import Validator

STOP_POLL_S = 2.0  # training seconds between reads at most (once a log line has measured a step): a stop's delay
OOM_AGREE_S = 5.0  # how long a rank out of memory waits to hear whether every rank is


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


@dataclass
class Pending:
    """A step not yet read back: its number, what it started from (to rewind to it), its values on the device."""
    step: int
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    scheduler: dict
    values: torch.Tensor


ROW = ("loss", "norm", "verdict", "loss_z", "loss_median", "norm_z", "norm_median", "applied", "rebase", "diverged",
       "stop", "fault", "seconds")  # the values of a Pending step, in order


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
        self.info, self.cfg, self.health = info, config.train, config.health
        self.eval_every, self.save_every = config.eval.every, config.checkpoint.every
        self.run_config = config_to_dict(config)  # stored in every checkpoint, so inference needs nothing else
        self.micro_batch, self.accum = self.cfg.batch_size, self.cfg.grad_accum_steps  # a back-off changes them
        self.step = 0
        self.best_val_loss = math.inf
        self.skipped_steps = 0
        self.last_norm = math.nan
        # steps between reads, set from the measured step time at each read; the first step is read at once, or
        # a stop signal before the first log line would wait up to log_every steps (minutes for a large model)
        self.poll = 1
        self.read_every_step = config.health.action in ("rollback", "stop")
        self._losses: list[float] = []
        self._pending: list[Pending] = []
        self._fault = torch.zeros((), dtype=torch.bool, device=info.device)  # an OOM since the last read, any rank
        self._fault_here = False  # ... on this rank: it takes its part in the collectives, computes nothing
        self._reduction_started = False  # DDP's reducer waits for this step's backward (finish_reduction)
        self._in_backward = False
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's first micro-batch
        self.last_loss, self.last_applied = math.nan, False
        self._last_step_s = 0.0
        self.guard = HealthGuard(config.health, info.device, scaler.is_enabled(), logger, config.checkpoint.dir)
        self.memory_history = config.health.memory_history and start_memory_history(info.device)
        self.snapshot: Snapshot | None = None
        self.take_snapshot()  # fit() takes it again after a resume; this one serves a caller of train_step alone

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
                "micro_batch": [self.micro_batch, self.accum], "health": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_val_loss = state["step"], state["best_val_loss"]
        self.skipped_steps = state["skipped_steps"]
        self.meter.train_seconds = state["train_seconds"]
        if "health" in state:  # absent in checkpoints from before run health
            self.guard.load_state_dict(state["health"])
        batch, accum = state.get("micro_batch", (self.micro_batch, self.accum))
        if batch < self.micro_batch and batch * accum == self.micro_batch * self.accum:
            self.log.info(f"resuming with train.batch_size={batch} and train.grad_accum_steps={accum} (the run backed "
                          f"off from {self.micro_batch} x {self.accum} after running out of memory; same global batch)")
            self._use_micro_batch(batch)

    def extra_state(self) -> dict:
        """Everything but the weights and optimizer state needed to continue exactly; collective
        (every rank contributes its RNG)."""
        return {ckpt.SCHEDULER: self.scheduler.state_dict(), ckpt.SCALER: self.scaler.state_dict(),
                ckpt.TRAINER: self.state_dict(), ckpt.RNG: gather_object(ckpt.rng_state(), self.info),
                ckpt.CONFIG: self.run_config, ckpt.FORMAT: ckpt.FORMAT_VERSION}

    def restore(self, source: str, state: dict) -> None:
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

    def _use_micro_batch(self, batch: int) -> None:
        self.accum = self.accum * self.micro_batch // batch
        self.micro_batch = batch
        self.plan = self.plan.with_micro_batch(batch)

    # -- one optimizer step, nothing read back -------------------------------------------------
    def advance(self) -> None:
        """Forward/backward over all micro-steps, the health verdict and the update it allows, all on the
        device; the step's values wait in _pending for the next read."""
        t0 = time.perf_counter()
        pending = Pending(self.step + 1, torch.get_rng_state(),
                          torch.cuda.get_rng_state() if self.info.device.type == "cuda" else None,
                          self.scheduler.state_dict(), torch.empty(0))
        loss_sum, faulted = self.accumulate()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = clip_grad_norm(self.raw, clip).float()
        dev = self.info.device
        flags = [torch.full((), float(x), device=dev) for x in  # no host-to-device copy: a fill each
                 (self.stop.received is not None or self.log.failure is not None, faulted, self._last_step_s)]
        # the one all-reduce besides the gradients': every rank judges the same loss and hears every rank's flags
        loss, stop, fault, seconds = all_reduce_sum(torch.stack([loss_sum / self.accum, *flags]), self.info)
        self._fault |= fault > 0
        judged = self.guard.judge(loss / self.info.world_size, norm, self._fault)
        step_unless(self.optimizer, ~judged["applied"])
        self.scaler.update()  # every step, applied or not, so the next unscale_ starts afresh
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first update (fp16 overflow, health) is not a misuse
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.step += 1
        self.guard.scale_lr(self.optimizer, self.step)
        values = {**judged, "loss": loss / self.info.world_size, "norm": norm, "stop": stop, "fault": self._fault,
                  "seconds": seconds / self.info.world_size}
        pending.values = torch.stack([values[k].float() for k in ROW])
        self._pending.append(pending)
        self._last_step_s = time.perf_counter() - t0

    def accumulate(self) -> tuple[torch.Tensor, bool]:
        """The summed loss of all micro-steps, and whether this rank ran out of memory and only took its part
        in the collectives (the step is then discarded on every rank at the next read, see read)."""
        if not self._fault_here:
            while True:
                try:
                    return self._micro_steps(), False
                except torch.OutOfMemoryError:
                    pass  # handled outside the except block, whose traceback still holds the step's activations
                self.optimizer.zero_grad(set_to_none=True)
                if not self._out_of_memory():
                    break
        elif not finish_reduction(self.model, self._batch, reducer_waits=False):  # discarded anyway: no compute
            raise self._oom_stop("while the other ranks wait in a collective it cannot rejoin")
        self.optimizer.zero_grad(set_to_none=True)
        return torch.zeros((), device=self.info.device), True

    def _micro_steps(self) -> torch.Tensor:
        self.model.train()
        loss_sum = torch.zeros((), device=self.info.device)
        self._reduction_started = self._in_backward = False
        x, y = self._batch = self.plan.batch(self.data_step, 0, self.info.device)
        for micro_step in range(self.accum):
            last = micro_step == self.accum - 1
            with maybe_no_sync(self.model, sync=last):
                with self.autocast:
                    _, loss = self.model(x, y)
                self._reduction_started = last
                if not last:  # gather the next batch while the device works
                    x, y = self.plan.batch(self.data_step, micro_step + 1, self.info.device)
                # divide so the accumulated gradient is the mean over the global batch
                self._in_backward = True
                self.scaler.scale(loss / self.accum).backward()
                self._in_backward = False
            loss_sum += loss.detach()
        return loss_sum

    def _out_of_memory(self) -> bool:
        """This rank ran out of memory in a forward or backward. True: every rank did, and all back off now.
        False: this rank alone; it takes its part in this step's gradient reduction with zero gradients
        (accumulate), flags the step, and every rank backs off together at the next read."""
        where = self._memory_snapshot()
        free_memory(self.info.device)
        if self.info.world_size == 1:
            self._back_off(self.step + 1, where)
            return True
        here = "backward" if self._in_backward else "forward"
        # keyed by the step and the micro-batch, which every rank has alike and every retry changes
        failed = agree_by_store(f"oom/{self.step}/{self.micro_batch}", here, self.info, OOM_AGREE_S)
        if failed is None:  # the others are in a collective that waits for this rank: join it, zero gradients
            if not finish_reduction(self.model, self._batch, reducer_waits=self._reduction_started):
                raise self._oom_stop("while the other ranks wait in a collective it cannot rejoin" + where)
            self._fault_here = True
            return False
        # a reducer waits: every rank takes part in that reduction, then all retry; a sharded backward cut short
        # cannot be taken up again, so there every rank stops alike
        if "backward" in failed and not finish_reduction(self.model, self._batch, self._reduction_started):
            raise self._oom_stop("in the backward, which the sharded model cannot take up again" + where)
        self._back_off(self.step + 1, where)
        return True

    def _back_off(self, step: int, where: str) -> None:
        """Every rank alike: the next smaller micro-batch with the same global batch, or give up."""
        b = self.micro_batch
        new = smaller_micro_batch(b) if self.health.oom_backoff else None
        if new is None:
            why = "micro-batch 1 cannot be smaller" if b == 1 else "health.oom_backoff=false"
            raise RunUnhealthy(f"out of memory at step {step} with train.batch_size={b} ({why}){where}; "
                               f"lower model.context_length or model.dim, set train.activation_checkpointing=true, "
                               f"or use distributed.strategy=fsdp")
        self._use_micro_batch(new)
        self.guard.backed_off(step, b, new, self.accum, where)

    def _oom_stop(self, why: str) -> RunUnhealthy:
        b = self.micro_batch
        new = smaller_micro_batch(b) or 1
        return RunUnhealthy(f"out of memory on rank {self.info.rank} at step {self.step + 1} with train.batch_size={b}, "
                            f"{why}; the last checkpoint is intact: continue with --resume auto train.batch_size={new} "
                            f"train.grad_accum_steps={self.accum * b // new} (the same global batch)")

    def _memory_snapshot(self) -> str:
        if not (self.memory_history and self.info.is_main and self.log.path is not None):
            return ""
        path = dump_memory_snapshot(self.log.path.parent, self.log.run_name, self.step + 1)
        return f"; memory snapshot {path} (drop it on https://pytorch.org/memory_viz to see who held what)"

    # -- reading the steps back ----------------------------------------------------------------
    def read(self) -> bool:
        """Read back the steps since the last read and act on them, alike on every rank: their health events,
        a back-off after an out-of-memory (its step and those after it are discarded and run again), a
        rollback, or health's stop. Returns whether a rank asked to stop (a signal, a failed side writer)."""
        pending, self._pending = self._pending, []
        if not pending:
            return False
        rows = [dict(zip(ROW, v)) for v in torch.stack([p.values for p in pending]).tolist()]  # the one host read
        self.meter.lap(len(rows))
        stop = any(r["stop"] for r in rows)
        for p, row in zip(pending, rows):
            self.last_loss, self.last_norm, self.last_applied = row["loss"], row["norm"], False
            if row["fault"]:  # a rank ran out of memory here: nothing since was applied
                self._rewind(p)
                self._fault.fill_(False)
                self._fault_here = False
                self._back_off(p.step, "")
                return stop
            try:
                action = self.guard.review(p.step, row, self.snapshot.trainer_state["step"] if self.snapshot else None)
            except RunUnhealthy:
                self._rewind(p)  # the state before the step (nothing more is saved)
                raise
            if action == ROLLBACK:
                self._rollback()
                return stop
            if action == STOP:
                self._rewind(p)
                self.save()
                raise RunUnhealthy(self.guard.stop_message(p.step))
            self._losses.append(row["loss"])
            self.last_applied = bool(row["applied"])
            self.skipped_steps += not self.last_applied
            if p.step % self.health.snapshot_every == 0:
                self.take_snapshot()
        mean_s = sum(r["seconds"] for r in rows) / len(rows)  # the same on every rank: all-reduced
        if mean_s > 0:
            self.poll = max(1, min(self.cfg.log_every, int(STOP_POLL_S / mean_s)))
        return stop

    def _rewind(self, p: Pending) -> None:
        """Back to where step p started: the weights and optimizer state are as it found them (its update and
        every later one were masked), so the step count, the schedule and the dropout RNG go back too."""
        self.step = p.step - 1
        torch.set_rng_state(p.rng)
        if p.cuda_rng is not None:
            torch.cuda.set_rng_state(p.cuda_rng)
        self.scheduler.load_state_dict(p.scheduler)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.guard.scale_lr(self.optimizer, self.step)

    def _rollback(self) -> None:
        state = self.snapshot.restore(self.raw, self.optimizer, self.scheduler, self.scaler)
        self.step = state["step"]
        self.guard.detector.load_state_dict(state["detector"])
        self.guard.scale_lr(self.optimizer, self.step)

    def take_snapshot(self) -> None:
        """The state a rollback returns to (rollback only); also taken at every checkpoint, so a rollback
        never goes behind a checkpoint on disk."""
        if self.health.action == "rollback":
            self.snapshot = Snapshot(self.raw, self.optimizer, self.scheduler, self.scaler,
                                     {"step": self.step, "detector": self.guard.detector.state_dict()})

    def train_step(self) -> tuple[float, float, bool]:
        """One step read back at once: (loss, grad norm, applied), the loss averaged over ranks (tests, benchmarks)."""
        self.advance()
        self.read()
        return self.last_loss, self.last_norm, self.last_applied

    # -- what the loop does when due -----------------------------------------------------------
    def log_progress(self) -> None:
        """One line (and TensorBoard scalars) for the steps since the last one."""
        mean_loss = sum(self._losses) / len(self._losses) if self._losses else math.nan  # each the mean over ranks
        self._losses = []
        tok_s = self.meter.tokens_per_sec()
        mfu = self.meter.mfu(tok_s / self.info.world_size)
        lr = self.scheduler.get_last_lr()[-1]  # the AdamW group's rate
        self.log.scalars(self.step, {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": self.last_norm,
                                     "train/tokens_per_sec": tok_s, "train/mfu": mfu,
                                     "train/skipped_steps": self.skipped_steps,
                                     "train/seconds": self.meter.train_seconds})
        self.log.info(f"step {self.step}/{self.cfg.max_steps} | loss {mean_loss:.4f} | lr {lr:.3e} | "
                      f"grad norm {self.last_norm:.3f} | {tok_s:,.0f} tok/s | MFU {mfu:.1%} | skipped "
                      f"{self.skipped_steps} | elapsed {format_seconds(self.meter.elapsed())} | eta "
                      f"{format_seconds(self.meter.eta(self.step))}")

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
        self.take_snapshot()

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

    def stop_reason(self, asked: bool) -> str | None:
        """Why to stop after this step, the same on every rank; None to go on. A side writer's failure does not
        return: it saves if it can and raises (stop_for_side_writer)."""
        if asked:
            failure = broadcast_object(self.log.failure, self.info)  # rank 0 writes the logs
            if failure:
                self.stop_for_side_writer(failure)  # raises, after saving if it can
            return f"stop signal received ({self.stop.received or 'on another rank'})"
        if self.cfg.stop_at_step and self.step == self.cfg.stop_at_step:  # 0 is "off", and also a step
            return f"train.stop_at_step={self.cfg.stop_at_step} reached"
        return None

    def read_due(self) -> bool:
        s = self.step
        return (self.read_every_step or s >= self.cfg.max_steps or s == self.cfg.stop_at_step or due(s, self.poll)
                or due(s, self.cfg.log_every) or due(s, self.eval_every) or due(s, self.save_every))

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to train.max_steps or a stop; returns the process exit code."""
        from tqdm import tqdm

        bar = tqdm(total=self.cfg.max_steps, initial=self.step, dynamic_ncols=True, leave=False,
                   disable=not (self.info.is_main and sys.stderr.isatty()))  # no bar in log files
        val: dict[str, float] = {}
        self.take_snapshot()
        self.meter.start()
        while self.step < self.cfg.max_steps:
            self.advance()
            if not self.read_due():
                continue
            asked = self.read()  # may rewind (out of memory) or roll back: the step is the one read back
            bar.n = self.step
            bar.refresh()
            last = self.step == self.cfg.max_steps
            if due(self.step, self.cfg.log_every) or last:
                self.log_progress()
            if due(self.step, self.eval_every) or last:
                val = self.validate()
            stop = self.stop_reason(asked)
            if due(self.step, self.save_every) or last or stop:
                self.save()
            self.meter.start()  # evaluation and saving are not training time
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

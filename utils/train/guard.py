"""The health guard: what run health decides about each step (health.* config); the Trainer acts.

`judge` gives a step's verdict on the device (no host read): whether its update is applied, and the
numbers behind it. Every rank judges the same all-reduced loss and the same grad norm, so every rank
reaches the same verdict. `review` reads a judged step back at a read point (utils/train/trainer.py)
and returns what the Trainer is to do: go on, roll back to its snapshot, or stop; it raises where the
run cannot go on. Every event is one log line, a metrics.jsonl row under health/, a TensorBoard text,
and part of the checkpoint, so a resume knows which data windows were skipped.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from models.config import HealthConfig
from utils.metrics.logger import MetricsLogger
from utils.train.health import (HEALTHY, NONFINITE, HealthEvent, RunUnhealthy, SpikeDetector, TrainingDiverged,
                                detail, robust_z, summary)

RESUME_CHECK_STEPS = 5  # losses after a resume compared, as one median, with the window before the save
FIX = "lower optim.lr, raise schedule.warmup_steps or use train.precision=bf16"
GO, ROLLBACK, STOP = "go", "rollback", "stop"


class HealthGuard:
    """The detector, the streak of events, the record of events and the data windows rollbacks skipped."""

    def __init__(self, cfg: HealthConfig, device: torch.device, loss_scaling: bool, log: MetricsLogger,
                 checkpoint_dir: str) -> None:
        self.cfg, self.log, self.checkpoint_dir = cfg, log, checkpoint_dir
        self.loss_scaling = loss_scaling  # fp16: an infinite norm is the GradScaler's overflow, not an event
        self.detector = SpikeDetector(cfg, device)
        self.streak = torch.zeros((), dtype=torch.long, device=device)  # events in a row
        self.resume_left = torch.zeros((), dtype=torch.long, device=device)  # spikes not judged (see resumed)
        self.events: list[HealthEvent] = []
        self.data_offset = 0  # data steps skipped by rollbacks so far
        self.rollbacks = 0
        self.lr_scale_until = 0
        self._before_resume: list[float] = []
        self._after_resume: list[float] | None = None

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"events": [dataclasses.asdict(e) for e in self.events], "data_offset": self.data_offset,
                "rollbacks": self.rollbacks, "streak": int(self.streak), "lr_scale_until": self.lr_scale_until,
                "detector": self.detector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.events = [HealthEvent(**{**e, "data_steps": tuple(e["data_steps"]) if e["data_steps"] else None})
                       for e in state["events"]]
        self.data_offset, self.rollbacks = state["data_offset"], state["rollbacks"]
        self.streak.fill_(state["streak"])
        self.lr_scale_until = state["lr_scale_until"]
        self.detector.load_state_dict(state["detector"])

    def resumed(self) -> None:
        """Judge the first steps after a resume against the losses saved with the checkpoint."""
        self._before_resume = self.detector.losses.state_dict()
        armed = self.detector.armed()
        self._after_resume = [] if armed else None
        self.resume_left.fill_(RESUME_CHECK_STEPS if armed else 0)

    # -- one step, on the device ---------------------------------------------------------------
    def judge(self, loss: Tensor, norm: Tensor, fault: Tensor) -> dict[str, Tensor]:
        """The verdict on one step and whether its update is applied. `fault`: a rank ran out of memory at
        this step or earlier since the last read; such steps are not judged, only discarded (Trainer.read)."""
        cfg = self.cfg
        judged = self.detector.judge(loss, norm, self.loss_scaling)
        verdict = judged["verdict"]
        # right after a resume the continuity check judges the loss level, not single spikes
        verdict = torch.where((verdict > NONFINITE) & (self.resume_left > 0), HEALTHY, verdict)
        counted = ~fault
        keep = (verdict == HEALTHY) & counted
        self.detector.accept(loss, norm, keep)
        self.resume_left.sub_(keep.long()).clamp_(min=0)
        event = (verdict != HEALTHY) & counted
        self.streak.copy_(torch.where(counted, torch.where(event, self.streak + 1, 0), self.streak))
        at_limit = event & (self.streak >= cfg.max_consecutive)
        spike = event & (verdict != NONFINITE)
        # skipped updates leave the weights as they were, so a rise that outlasts max_consecutive of them is in
        # the data or the weights: it becomes the level judged from (non-finite steps still stop the run)
        rebase = at_limit & spike if cfg.action == "skip" else torch.zeros_like(at_limit)
        self.detector.reset(rebase)
        self.streak.masked_fill_(rebase, 0)
        healthy_or_logged = keep | (spike & (cfg.action == "log"))
        applied = healthy_or_logged & torch.isfinite(norm)  # never a non-finite update (fp16: the scaler's skip)
        return {**judged, "verdict": verdict, "applied": applied, "rebase": rebase, "diverged": at_limit & ~rebase}

    # -- a step read back, on the host -----------------------------------------------------------
    def review(self, step: int, row: dict[str, float], snapshot_step: int | None) -> str:
        """GO, ROLLBACK (to the snapshot of snapshot_step: the windows since are skipped) or STOP for a step
        read back; its events are reported. Raises where the run cannot go on."""
        if row["verdict"] == HEALTHY:
            self._healthy(step, row["loss"])
            return GO
        cfg = self.cfg
        event = HealthEvent(step, "nonfinite" if row["verdict"] == NONFINITE else "spike", cfg.action,
                            detail(int(row["verdict"]), row["loss"], row["norm"], row))
        rollback = cfg.action == "rollback" and self.rollbacks < cfg.max_rollbacks
        if rollback:
            # 1-based, as steps are named: data step k holds the windows step k trains on when nothing was skipped
            event.data_steps = (snapshot_step + self.data_offset + 1, step + self.data_offset)
            if cfg.rollback_lr_steps and cfg.rollback_lr_factor < 1:
                event.detail += (f"; back to step {snapshot_step} with the LR x{cfg.rollback_lr_factor} until step "
                                 f"{snapshot_step + cfg.rollback_lr_steps}")
        self._report(event)
        if row["rebase"]:
            self._report(HealthEvent(step, "level", "rebase",
                                     f"the loss stayed up for {cfg.max_consecutive} skipped updates; judged from "
                                     f"this level after health.arm_after={cfg.arm_after} steps (health.action="
                                     f"rollback returns to the last snapshot instead)"))
        elif row["diverged"]:
            what = "non-finite" if row["verdict"] == NONFINITE else "spiking"
            raise TrainingDiverged(f"loss or gradient norm was {what} for {cfg.max_consecutive} steps in a row (step "
                                   f"{step}); stopped without saving, so the last checkpoint in "
                                   f"{self.checkpoint_dir} is intact; {FIX}")
        if cfg.action == "stop":
            return STOP
        if cfg.action == "rollback":
            if not rollback:
                raise RunUnhealthy(f"{event.event} at step {step} after {self.rollbacks} rollbacks "
                                   f"(health.max_rollbacks={cfg.max_rollbacks}); stopped without saving, so the "
                                   f"last checkpoint in {self.checkpoint_dir} is intact; {FIX}")
            self.data_offset += event.data_steps[1] - event.data_steps[0] + 1
            self.rollbacks += 1
            self.lr_scale_until = snapshot_step + cfg.rollback_lr_steps
            return ROLLBACK
        return GO

    def stop_message(self, step: int) -> str:
        event = self.events[-1]
        return (f"health.action=stop: {event.event} at step {step} ({event.detail}); saved the state before it; "
                f"{FIX}, then continue with --resume auto")

    def _healthy(self, step: int, loss: float) -> None:
        if self._after_resume is None:
            return
        self._after_resume.append(loss)
        if len(self._after_resume) < RESUME_CHECK_STEPS:
            return
        after, self._after_resume = sorted(self._after_resume), None
        z = robust_z(after[len(after) // 2], self._before_resume, self.cfg.min_rel_rise)
        if z > self.cfg.loss_z:
            self._report(HealthEvent(step, "resume_jump", "warn",
                                     f"the median loss of the first {RESUME_CHECK_STEPS} steps after resuming, "
                                     f"{after[len(after) // 2]:.4f}, is {z:.1f} deviations above the window before "
                                     f"the save; did the data folder, the config or the code change?"))
            self.detector.reset(torch.ones((), dtype=torch.bool, device=self.streak.device))  # judge the new level

    def scale_lr(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """The LR of a recovery: LambdaLR sets each group's rate afresh every step, so the factor never compounds."""
        if step < self.lr_scale_until:
            for g in optimizer.param_groups:
                g["lr"] *= self.cfg.rollback_lr_factor

    def backed_off(self, step: int, old: int, new: int, accum: int, where: str) -> None:
        self._report(HealthEvent(step, "oom", "backoff",
                                 f"out of memory at micro-batch {old}{where}; retrying with train.batch_size={new} x "
                                 f"train.grad_accum_steps={accum}, the same global batch"))

    # -- reporting -----------------------------------------------------------------------------
    def _report(self, event: HealthEvent) -> None:
        self.events.append(event)
        self.log.info(event.line())
        self.log.event(event.step, event.row(), "health", event.line())

    def summary(self) -> str:
        return summary(self.events)

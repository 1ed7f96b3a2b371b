"""The health guard: what the Trainer does about an unhealthy step (health.* config).

Per optimizer step the Trainer asks `judge` whether to apply the update (every rank asks with the
same all-reduced loss and grad norm, so every rank gets the same answer), then `settle` carries out
the configured action for an event (skip, rollback, stop, log) and says whether the step counts.
Out of memory in forward/backward comes to `out_of_memory`, which shrinks the micro-batch. Every
event is one log line, a metrics.jsonl row under health/, a TensorBoard text, and part of the
checkpoint, so a resume knows which data windows were skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from models.config import HealthConfig
from models.config_loader import config_from_dict, config_to_yaml
from utils.distributed.process_group import gather_object
from utils.train.health import HealthEvent, RunUnhealthy, SpikeDetector, TrainingDiverged, robust_z, summary
from utils.train.oom import dump_memory_snapshot, free_memory, smaller_micro_batch, start_memory_history
from utils.train.rollback import Snapshot

RESUME_CHECK_STEPS = 5  # losses after a resume compared, as one median, with the window before the save
FIX = "lower optim.lr, raise schedule.warmup_steps or use train.precision=bf16"


class HealthGuard:
    """The Trainer's health: the detector, the actions, the out-of-memory back-off and the record of events."""

    def __init__(self, trainer: Any, cfg: HealthConfig) -> None:  # the Trainer that owns it (and imports this)
        self.t, self.cfg = trainer, cfg
        self.detector = SpikeDetector(cfg)
        self.events: list[HealthEvent] = []
        self.data_offset = 0  # data steps skipped by rollbacks so far
        self.rollbacks = self.streak = 0
        self.lr_scale_until = 0
        self.pending: HealthEvent | None = None
        self.snapshot: Snapshot | None = None
        self._after_resume: list[float] | None = None
        self._before_resume: list[float] = []
        self.memory_history = cfg.memory_history and start_memory_history(trainer.info.device)
        self.take_snapshot()  # fit() takes it again after a resume; this one serves a caller of train_step alone

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"events": [dataclasses.asdict(e) for e in self.events], "data_offset": self.data_offset,
                "rollbacks": self.rollbacks, "streak": self.streak, "lr_scale_until": self.lr_scale_until,
                "detector": self.detector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.events = [HealthEvent(**{**e, "data_steps": tuple(e["data_steps"]) if e["data_steps"] else None})
                       for e in state["events"]]
        self.data_offset, self.rollbacks, self.streak = state["data_offset"], state["rollbacks"], state["streak"]
        self.lr_scale_until = state["lr_scale_until"]
        self.detector.load_state_dict(state["detector"])

    def resumed(self) -> None:
        """Judge the first steps after a resume against the losses saved with the checkpoint."""
        self._before_resume = list(self.detector.losses)
        self._after_resume = [] if self.detector.armed() else None

    # -- one step ------------------------------------------------------------------------------
    def judge(self, loss: float, norm: float) -> bool:
        """Whether to apply this step's update; an event is kept for `settle`."""
        kind, detail = self.detector.check(loss, norm, norm_can_overflow=self.t.scaler.is_enabled())
        if self._after_resume is not None and kind == "spike":
            kind = None  # right after a resume the continuity check judges the loss level
        if kind is None:
            self._healthy(loss, norm)
            return True
        self.pending = HealthEvent(self.t.step + 1, kind, self.cfg.action, detail)
        return self.cfg.action == "log" and kind == "spike"  # a non-finite update is never applied

    def _healthy(self, loss: float, norm: float) -> None:
        self.streak = 0
        self.detector.accept(loss, norm)
        if self._after_resume is None:
            return
        self._after_resume.append(loss)
        if len(self._after_resume) < RESUME_CHECK_STEPS:
            return
        after, self._after_resume = sorted(self._after_resume), None
        z = robust_z(after[len(after) // 2], self._before_resume, self.cfg.min_rel_rise)
        if z > self.cfg.loss_z:
            self._report(HealthEvent(self.t.step + 1, "resume_jump", "warn",
                                     f"the median loss of the first {RESUME_CHECK_STEPS} steps after resuming, "
                                     f"{after[len(after) // 2]:.4f}, is {z:.1f} deviations above the window before "
                                     f"the save; did the data folder, the config or the code change?"))
            self.detector.reset()  # judge the run on its new level from here on

    def settle(self) -> bool:
        """Carry out the pending event's action; False when the run was rolled back (the step does not count)."""
        event, self.pending = self.pending, None
        if event is None:
            return True
        if event.action == "rollback" and self.rollbacks < self.cfg.max_rollbacks:
            back_to = self.snapshot.trainer_state["step"]
            # 1-based, as steps are named: data step k holds the windows step k trains on when nothing was skipped
            event.data_steps = (back_to + self.data_offset + 1, self.t.step + self.data_offset + 1)
            if self.cfg.rollback_lr_steps and self.cfg.rollback_lr_factor < 1:
                event.detail += (f"; back to step {back_to} with the LR x{self.cfg.rollback_lr_factor} until step "
                                 f"{back_to + self.cfg.rollback_lr_steps}")
        self._report(event)
        self.streak += 1
        if self.streak >= self.cfg.max_consecutive and event.event == "spike" and event.action == "skip":
            self._rebase(event)
        elif self.streak >= self.cfg.max_consecutive:
            what = "non-finite" if event.event == "nonfinite" else "spiking"
            raise TrainingDiverged(f"loss or gradient norm was {what} for {self.streak} steps in a row (step "
                                   f"{event.step}); stopped without saving, so the last checkpoint in "
                                   f"{self.t.checkpointer.dir} is intact; {FIX}")
        if event.action == "stop":
            self.t.save()
            raise RunUnhealthy(f"health.action=stop: {event.event} at step {event.step} ({event.detail}); "
                               f"saved the state before it; {FIX}, then continue with --resume auto")
        if event.action == "rollback":
            self._rollback(event)
            return False
        return True

    def _rebase(self, event: HealthEvent) -> None:
        """Skipped updates leave the weights as they were, so a rise that outlasts max_consecutive of them
        is not undone by skipping more (it is in the data, or in the weights from before): it becomes the
        level the detector judges from, and training goes on (non-finite steps still stop the run)."""
        self.streak = 0
        self.detector.reset()
        self._report(HealthEvent(event.step, "level", "rebase",
                                 f"the loss stayed up for {self.cfg.max_consecutive} skipped updates; judged from "
                                 f"this level after health.arm_after={self.cfg.arm_after} steps (health.action="
                                 f"rollback returns to the last snapshot instead)"))

    def _rollback(self, event: HealthEvent) -> None:
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise RunUnhealthy(f"{event.event} at step {event.step} after {self.rollbacks} rollbacks "
                               f"(health.max_rollbacks={self.cfg.max_rollbacks}); stopped without saving, so the "
                               f"last checkpoint in {self.t.checkpointer.dir} is intact; {FIX}")
        t, skipped = self.t, event.data_steps
        state = self.snapshot.restore(t.raw, t.optimizer, t.scheduler, t.scaler)
        t.step = state["step"]
        self.detector.load_state_dict(state["detector"])
        self.data_offset += skipped[1] - skipped[0] + 1
        self.rollbacks += 1
        self.lr_scale_until = t.step + self.cfg.rollback_lr_steps
        self.scale_lr()

    def step_done(self) -> None:
        """After the step counted: the LR of a recovery, and the snapshot when due."""
        self.scale_lr()
        if self.t.step % self.cfg.snapshot_every == 0:
            self.take_snapshot()

    def scale_lr(self) -> None:
        """LambdaLR sets each group's rate afresh every step, so the factor never compounds."""
        if self.t.step < self.lr_scale_until:
            for g in self.t.optimizer.param_groups:
                g["lr"] *= self.cfg.rollback_lr_factor

    def take_snapshot(self) -> None:
        """The state a rollback returns to (rollback only); also taken at every checkpoint, so a rollback
        never goes behind a checkpoint on disk."""
        if self.cfg.action == "rollback":
            t = self.t
            self.snapshot = Snapshot(t.raw, t.optimizer, t.scheduler, t.scaler,
                                     {"step": t.step, "detector": self.detector.state_dict()})

    # -- out of memory -------------------------------------------------------------------------
    def out_of_memory(self) -> None:
        """Shrink the micro-batch (all ranks to the same size) after an OOM in forward/backward, or give up."""
        t = self.t
        b, accum = t.cfg.batch_size, t.cfg.grad_accum_steps
        where = ""
        if self.memory_history and t.info.is_main and t.log.path is not None:
            path = dump_memory_snapshot(t.log.path.parent, t.log.run_name, t.step + 1)
            where = f"; memory snapshot {path} (drop it on https://pytorch.org/memory_viz to see who held what)"
        free_memory(t.info.device)
        sizes = gather_object(smaller_micro_batch(b) if self.cfg.oom_backoff else None, t.info)
        if None in sizes:
            why = "micro-batch 1 cannot be smaller" if b == 1 else "health.oom_backoff=false"
            raise RunUnhealthy(f"out of memory at step {t.step + 1} with train.batch_size={b} ({why}){where}; "
                               f"lower model.context_length or model.dim, set train.activation_checkpointing=true, "
                               f"or use distributed.strategy=fsdp")
        new = min(sizes)
        t.cfg = dataclasses.replace(t.cfg, batch_size=new, grad_accum_steps=accum * b // new)
        t.plan = t.plan.with_micro_batch(new)
        t.run_config["train"].update(batch_size=new, grad_accum_steps=t.cfg.grad_accum_steps)  # in every checkpoint
        t.checkpointer.record_config(config_to_yaml(config_from_dict(t.run_config)))
        self._report(HealthEvent(t.step + 1, "oom", "backoff",
                                 f"out of memory at micro-batch {b}; retrying with train.batch_size={new} x "
                                 f"train.grad_accum_steps={t.cfg.grad_accum_steps}, the same global batch{where}"))

    # -- reporting -----------------------------------------------------------------------------
    def _report(self, event: HealthEvent) -> None:
        self.events.append(event)
        self.t.log.info(event.line())
        self.t.log.event(event.step, event.row(), "health", event.line())

    def summary(self) -> str:
        return summary(self.events)

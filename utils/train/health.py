"""Run health: the detector that judges each optimizer step's loss and grad norm, and the record of
what the run did about it (health.* config; the actions themselves are the Trainer's).

The detector keeps a window of the last `health.window` healthy steps and flags a step whose value
is more than `z` robust deviations above the window's median, the deviation being 1.4826 x the
median absolute deviation (a standard deviation for Gaussian noise, but not dragged up by the
spikes it is meant to find), and at least `min_rel_rise` x the median so a flat, quiet window does
not turn noise into events. Only rises count: a falling loss is the point of training. Every rank
feeds it the same all-reduced values, so every rank reaches the same verdict.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

from models.config import HealthConfig
from utils.errors import UserError

MAD_TO_SIGMA = 1.4826  # MAD x this = sigma for normally distributed values
LOG_FLOOR = math.log(1.05)


class RunUnhealthy(UserError):
    """The run cannot go on healthily: health.action=stop, too many rollbacks, or out of memory at micro-batch 1."""


class TrainingDiverged(RunUnhealthy):
    """health.max_consecutive unhealthy steps in a row (non-finite, or spiking under rollback, stop or log)."""


def median_mad(values: list[float]) -> tuple[float, float]:
    """The median and the median absolute deviation from it."""
    median = _median(sorted(values))
    return median, _median(sorted(abs(v - median) for v in values))


def robust_z(value: float, history: list[float], min_rel_rise: float) -> float:
    """How far value lies above the median of history, in robust deviations (each at least
    min_rel_rise x the median)."""
    median, mad = median_mad(history)
    return (value - median) / max(MAD_TO_SIGMA * mad, min_rel_rise * abs(median), 1e-12)


def log_z(norm: float, log_history: list[float]) -> float:
    """How far log(norm) lies above the median of the logs of past norms, in robust deviations (each at
    least log 1.05): grad norms vary by factors, not by amounts, with a heavy upper tail."""
    median, mad = median_mad(log_history)
    return (math.log(max(norm, 1e-30)) - median) / max(MAD_TO_SIGMA * mad, LOG_FLOOR)


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


class SpikeDetector:
    """Judges (loss, grad norm) pairs; `check` is pure, `accept` adds a healthy step to the window."""

    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.log_norms: deque[float] = deque(maxlen=cfg.window)  # logs kept, not recomputed every step

    def armed(self) -> bool:
        return len(self.losses) >= max(self.cfg.arm_after, 1)

    def check(self, loss: float, norm: float, norm_can_overflow: bool = False) -> tuple[str | None, str]:
        """(event, detail): event is None for a healthy step, else "nonfinite" or "spike".

        norm_can_overflow: fp16's GradScaler sees an infinite norm whenever its scale is too high
        and skips that step itself, so only the loss can make such a step an event."""
        if not math.isfinite(loss) or not (math.isfinite(norm) or norm_can_overflow):
            return "nonfinite", f"loss {loss:.4g}, grad norm {norm:.4g}"
        if not self.armed():
            return None, ""
        z_loss = robust_z(loss, list(self.losses), self.cfg.min_rel_rise)
        if z_loss > self.cfg.loss_z:
            return "spike", f"loss {loss:.4f} is {z_loss:.1f} deviations above the median {median_mad(list(self.losses))[0]:.4f}"
        if self.cfg.grad_norm_z and math.isfinite(norm):
            z_norm = log_z(norm, list(self.log_norms))
            if z_norm > self.cfg.grad_norm_z:
                return "spike", (f"grad norm {norm:.4g} is {z_norm:.1f} deviations above the median "
                                 f"{math.exp(median_mad(list(self.log_norms))[0]):.4g}")
        return None, ""

    def accept(self, loss: float, norm: float) -> None:
        self.losses.append(loss)
        if math.isfinite(norm):
            self.log_norms.append(math.log(max(norm, 1e-30)))

    def reset(self) -> None:
        self.losses.clear()
        self.log_norms.clear()

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "log_norms": list(self.log_norms)}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self.losses.extend(state["losses"])
        self.log_norms.extend(state["log_norms"])


@dataclass
class HealthEvent:
    """One event, as written to metrics.jsonl under health/ and kept in the checkpoint."""
    step: int
    event: str  # nonfinite | spike | level | oom | resume_jump
    action: str  # skip | rollback | stop | log | rebase | backoff | warn
    detail: str
    data_steps: tuple[int, int] | None = None  # the data windows (as data steps, inclusive) never trained on

    def row(self) -> dict[str, object]:
        return {f"health/{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k != "step" and v is not None}

    def line(self) -> str:
        skipped = f"; data steps {self.data_steps[0]}-{self.data_steps[1]} skipped" if self.data_steps else ""
        return f"health: step {self.step}: {self.event} ({self.detail}): {self.action}{skipped}"


def summary(events: list[HealthEvent]) -> str:
    """The end-of-run line: how many of each action, at which steps, which data windows."""
    if not events:
        return "health: no events"
    parts = []
    for action in dict.fromkeys(e.action for e in events):
        mine = [e for e in events if e.action == action]
        steps = ", ".join(str(e.step) for e in mine[:10]) + (" ..." if len(mine) > 10 else "")
        parts.append(f"{len(mine)} {action} (step {steps})")
    windows = [f"{e.data_steps[0]}-{e.data_steps[1]}" for e in events if e.data_steps]
    return (f"health: {len(events)} event(s): " + "; ".join(parts)
            + (f"; data steps skipped: {', '.join(windows)}" if windows else ""))

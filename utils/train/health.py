"""Run health: the detector that judges each optimizer step's loss and grad norm on the device, and the
record of what the run did about it (health.* config; the actions are the Trainer's, utils/train/guard.py
decides them).

The detector keeps a window of the last `health.window` healthy steps and flags a step whose value
is more than `z` robust deviations above the window's median, the deviation being 1.4826 x the
median absolute deviation (a standard deviation for Gaussian noise, but not dragged up by the
spikes it is meant to find), and at least `min_rel_rise` x the median so a flat, quiet window does
not turn noise into events. Only rises count: a falling loss is the point of training. Every rank
feeds it the same all-reduced values, so every rank reaches the same verdict.

Everything here is tensor arithmetic on the training device: judging a step reads nothing back to the
host, so the GPU never waits for the CPU between log lines. The window is a ring buffer whose empty
slots are NaN (sorted last), so the median of however many values it holds is two gathers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from models.config import HealthConfig
from utils.errors import UserError

MAD_TO_SIGMA = 1.4826  # MAD x this = sigma for normally distributed values
LOG_FLOOR = math.log(1.05)
HEALTHY, NONFINITE, LOSS_SPIKE, NORM_SPIKE = 0, 1, 2, 3  # a step's verdict, as the device records it


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


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


class Window:
    """The last `size` accepted values, on the device; `push` is masked, so a step can be left out
    without the host deciding it."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.values = torch.full((size,), math.nan, dtype=torch.float64, device=device)  # as the host would judge
        self.count = torch.zeros((), dtype=torch.long, device=device)  # how many it holds (at most size)
        self.next = torch.zeros((), dtype=torch.long, device=device)  # the slot the next value goes to

    def push(self, value: Tensor, keep: Tensor) -> None:
        value = value.double()
        slot = self.next.view(1)
        self.values.index_copy_(0, slot, torch.where(keep, value, self.values.index_select(0, slot)[0]).view(1))
        self.next.copy_((self.next + keep) % self.values.numel())
        self.count.copy_(torch.clamp(self.count + keep, max=self.values.numel()))

    def clear(self, where: Tensor) -> None:
        self.values.masked_fill_(where, math.nan)
        self.count.masked_fill_(where, 0)
        self.next.masked_fill_(where, 0)

    def median_mad(self) -> tuple[Tensor, Tensor]:
        """The median of the values held and their median absolute deviation (NaN while empty)."""
        median = self._median(self.values)
        return median, self._median((self.values - median).abs())

    def _median(self, values: Tensor) -> Tensor:
        ordered = values.sort().values  # NaN (the empty slots) last
        lo, hi = ((self.count - 1).clamp(min=0) // 2).view(1), (self.count // 2).clamp(max=values.numel() - 1).view(1)
        return 0.5 * (ordered.index_select(0, lo) + ordered.index_select(0, hi))[0]

    def state_dict(self) -> list[float]:
        """The values held, oldest first (read on the host: only when saving)."""
        count, start = int(self.count), int(self.next) - int(self.count)
        return [float(v) for v in self.values.roll(-start)[:count]] if count else []

    def load_state_dict(self, values: list[float]) -> None:
        self.clear(torch.ones((), dtype=torch.bool, device=self.values.device))
        values = values[-self.values.numel():]
        self.values[:len(values)] = torch.tensor(values, dtype=self.values.dtype)
        self.count.fill_(len(values))
        self.next.fill_(len(values) % self.values.numel())


class SpikeDetector:
    """Judges (loss, grad norm) pairs on the device; `judge` is pure, `accept` adds the healthy ones."""

    def __init__(self, cfg: HealthConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.losses, self.log_norms = Window(cfg.window, device), Window(cfg.window, device)

    def judge(self, loss: Tensor, norm: Tensor, norm_can_overflow: bool = False) -> dict[str, Tensor]:
        """The verdict (HEALTHY, NONFINITE, LOSS_SPIKE or NORM_SPIKE) and the numbers behind it.

        norm_can_overflow: fp16's GradScaler sees an infinite norm whenever its scale is too high
        and skips that step itself, so only the loss can make such a step an event."""
        loss, norm = loss.double(), norm.double()
        finite = torch.isfinite(loss) & (torch.isfinite(norm) | norm_can_overflow)
        armed = self.losses.count >= max(self.cfg.arm_after, 1)
        loss_median, loss_mad = self.losses.median_mad()
        loss_z = (loss - loss_median) / torch.clamp(torch.maximum(MAD_TO_SIGMA * loss_mad,
                                                                  self.cfg.min_rel_rise * loss_median.abs()), min=1e-12)
        norm_median, norm_mad = self.log_norms.median_mad()
        norm_z = (norm.clamp(min=1e-30).log() - norm_median) / torch.clamp(MAD_TO_SIGMA * norm_mad, min=LOG_FLOOR)
        loss_spike = armed & (loss_z > self.cfg.loss_z)
        norm_spike = armed & torch.isfinite(norm) & (norm_z > self.cfg.grad_norm_z) if self.cfg.grad_norm_z else \
            torch.zeros_like(armed)
        verdict = torch.where(~finite, NONFINITE, torch.where(loss_spike, LOSS_SPIKE,
                                                              torch.where(norm_spike, NORM_SPIKE, HEALTHY)))
        return {"verdict": verdict, "loss_z": loss_z, "loss_median": loss_median, "norm_z": norm_z,
                "norm_median": norm_median.exp()}

    def accept(self, loss: Tensor, norm: Tensor, keep: Tensor) -> None:
        self.losses.push(loss, keep)
        self.log_norms.push(norm.clamp(min=1e-30).log(), keep & torch.isfinite(norm))

    def reset(self, where: Tensor) -> None:
        self.losses.clear(where)
        self.log_norms.clear(where)

    def armed(self) -> bool:
        return int(self.losses.count) >= max(self.cfg.arm_after, 1)

    def state_dict(self) -> dict:
        return {"losses": self.losses.state_dict(), "log_norms": self.log_norms.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.load_state_dict(state["losses"])
        self.log_norms.load_state_dict(state["log_norms"])


def detail(verdict: int, loss: float, norm: float, numbers: dict[str, float]) -> str:
    """The words of a step's verdict, from the numbers the device judged it by."""
    if verdict == NONFINITE:
        return f"loss {loss:.4g}, grad norm {norm:.4g}"
    if verdict == LOSS_SPIKE:
        return f"loss {loss:.4f} is {numbers['loss_z']:.1f} deviations above the median {numbers['loss_median']:.4f}"
    return f"grad norm {norm:.4g} is {numbers['norm_z']:.1f} deviations above the median {numbers['norm_median']:.4g}"


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

"""Progress of a long step (dataset preparation, evaluation, export, benchmark): a tqdm bar when stderr
is a terminal, otherwise one plain line every few seconds (BYTEGPT_PROGRESS_INTERVAL, default 30),
never both, so a redirected log holds readable lines and no carriage-return bar fragments.
"""

from __future__ import annotations

import math
import os
import sys
import time

from utils.errors import UserError

INTERVAL_ENV = "BYTEGPT_PROGRESS_INTERVAL"


class LineProgress:
    """tqdm's update/close interface, printing at most every `interval` s:
    `desc: done of total unit (p%), rate unit/s, t s elapsed, ETA s` (bytes in the largest of B, kB, MB,
    GB that the total fills, so a small split does not read "0 of 0 MB")."""

    def __init__(self, total: int, desc: str, unit: str, interval: float) -> None:
        self.total, self.desc, self.interval = total, desc, interval
        self.scale, self.unit = (1, unit)
        if unit == "B":
            self.scale, self.unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                                         if total >= s or s == 1)
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        rate = self.n / max(elapsed, 1e-9)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {max(self.total - self.n, 0) / max(rate, 1e-9):,.0f} s" if self.total else ""
        print(f"{self.desc}: {self.n / self.scale:,.0f} of {self.total / self.scale:,.0f} {self.unit}{pct}, "
              f"{rate / self.scale:,.1f} {self.unit}/s, {elapsed:,.0f} s elapsed{eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True, interval: float | None = None):
    """A bar or a line printer for `total` units of work (unit "B": bytes); silent when not enabled (other
    ranks). `interval` (seconds between lines) defaults to BYTEGPT_PROGRESS_INTERVAL, else 30."""
    if not enabled:
        interval = math.inf
    elif interval is None:
        try:
            interval = float(os.environ.get(INTERVAL_ENV, "30"))
        except ValueError:
            raise UserError(f"{INTERVAL_ENV} must be a number of seconds (got {os.environ[INTERVAL_ENV]!r})") from None
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        # leave=None: a bar of its own stays when done (with its totals); one under the training bar vanishes
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024, leave=None,
                    dynamic_ncols=True, file=sys.stderr)
    return LineProgress(total, desc, unit, interval)

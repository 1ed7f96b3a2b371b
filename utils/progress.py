"""Progress of a long step (evaluation, export, benchmark): a tqdm bar when stderr is a terminal,
otherwise one plain line every BYTEGPT_PROGRESS_INTERVAL seconds (default 30), never both, so a
redirected log holds readable lines and no carriage-return bar fragments.
"""

from __future__ import annotations

import math
import os
import sys
import time

from utils.errors import UserError

INTERVAL_ENV = "BYTEGPT_PROGRESS_INTERVAL"


class LineProgress:
    """tqdm's update/close interface, printing `desc: n/total unit (p%), t s elapsed` at most every interval s."""

    def __init__(self, total: int, desc: str, unit: str, interval: float) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            print(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}{pct}, {now - self.start:.0f} s elapsed",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A bar or a line printer for `total` units of work; silent when not enabled (other ranks)."""
    try:
        interval = float(os.environ.get(INTERVAL_ENV, "30")) if enabled else math.inf
    except ValueError:
        raise UserError(f"{INTERVAL_ENV} must be a number of seconds (got {os.environ[INTERVAL_ENV]!r})") from None
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        # leave=False: the bar disappears when done, so it never mixes with the lines printed after it
        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
    return LineProgress(total, desc, unit, interval)

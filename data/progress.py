"""Progress of a long preparation: a tqdm bar on a terminal, a log line every few seconds otherwise.

Never both: a bar in a log file is a wall of carriage returns, and log lines would break a bar.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts input bytes consumed out of `total` and reports rate and ETA."""

    def __init__(self, total: int, desc: str, every: float = 5.0, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.every, self.stream = total, desc, every, stream or sys.stderr
        self.done, self.start = 0, time.monotonic()
        self.last = self.start
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                            file=self.stream, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = max(self.total - self.done, 0) / max(rate, 1e-9)
            print(f"{self.desc}: {self.done / 1e6:,.0f} of {self.total / 1e6:,.0f} MB "
                  f"({100 * self.done / max(self.total, 1):.0f}%), {rate / 1e6:,.1f} MB/s, ETA {eta:,.0f} s",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

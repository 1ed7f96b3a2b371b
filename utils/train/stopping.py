"""The one owner of stopping early: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) set a flag that each step
carries to every rank in its all-reduce (Trainer.advance); the ranks read it back together at the next
read point, so they stop on the same step and save one consistent checkpoint. A second Ctrl-C aborts
at once without saving.
"""

from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """Installs the handlers while active (`with StopFlag() as stop:`); restores the old ones after."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: the user wants out now
        self.received = signal.Signals(signum).name

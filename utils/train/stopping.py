"""The one owner of stopping early: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) set a flag that the loop
reads after each optimizer step; `should_stop` asks all ranks at once, so they stop on the same
step and save one consistent checkpoint. A second Ctrl-C aborts at once without saving.
"""

from __future__ import annotations

import signal
from types import FrameType

from utils.distributed.process_group import DistInfo, any_rank

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

    def should_stop(self, info: DistInfo, failing: bool = False) -> bool:
        """Collective: True on every rank if any rank received a stop signal (or is `failing`)."""
        return any_rank(self.received is not None or failing, info)

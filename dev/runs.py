"""A finished run's metrics.jsonl (utils/metrics/sinks.py writes it), read back at full precision: the
figures dev/ablate.py, dev/record.py and dev/gpu_track.sh compare."""

from __future__ import annotations

import json
from pathlib import Path

from utils.errors import UserError


def read_metrics(log_dir: Path) -> list[dict[str, float]]:
    """The rows of the one run's metrics.jsonl in log_dir (logging.dir), in the order they were logged."""
    found = sorted(Path(log_dir).glob("*.metrics.jsonl"))
    if not found:
        raise UserError(f"{log_dir} holds no *.metrics.jsonl: the run stopped before its logger started")
    return [json.loads(line) for line in found[-1].read_text().splitlines()]

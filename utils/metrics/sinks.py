"""Where a run's metrics go besides the console, the text log and TensorBoard: a metrics.jsonl file
next to the text log, and optionally Weights & Biases. MetricsLogger owns one of each on rank 0.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

from models.config import LoggingConfig
from utils.errors import UserError

WANDB_INSTALL = "pip install wandb"


class JsonlSink:
    """One JSON object per line: {"step", "wall_time" (Unix seconds, as TensorBoard records it), scalars...}.

    Each line is written whole and flushed at once, so a crash leaves a file valid up to its last line.
    Non-finite values (an MFU with no known peak) are written as null: JSON has no NaN.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", buffering=1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.row(step, {k: (float(v) if math.isfinite(v) else None) for k, v in values.items()})

    def row(self, step: int, values: dict[str, object]) -> None:
        self.file.write(json.dumps({"step": step, "wall_time": time.time(), **values}) + "\n")

    def close(self) -> None:
        self.file.close()


def require_wandb(cfg: LoggingConfig) -> None:
    """Refuse to start a run that asks for W&B when the package is missing (every rank checks, so all stop)."""
    if not cfg.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"logging.wandb=true needs the wandb package: {WANDB_INSTALL} "
                        f"(or set logging.wandb=false)") from None


class WandbSink:
    """A W&B run holding the config, every scalar at its step and the text samples as HTML."""

    def __init__(self, cfg: LoggingConfig, config: dict, run_name: str, log_dir: Path) -> None:
        import wandb

        self.wandb = wandb
        kwargs = {"mode": cfg.wandb_mode} if cfg.wandb_mode else {}  # unset: WANDB_MODE decides, as wandb documents
        try:
            self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or run_name, config=config,
                                  dir=str(log_dir), **kwargs)
        except Exception as e:  # wandb raises its own error types for login and network failures
            raise UserError(f"wandb.init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"run `wandb login`, or set logging.wandb_mode=offline and upload later with "
                            f"`wandb sync`") from None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()

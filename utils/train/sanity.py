"""Settings that make a run pointless, found at start before anything is written: one warning line
each (the run may still be what the user wants, e.g. a smoke test), or a ConfigError where the run
could not do what was asked. Refused elsewhere already, and listed in docs/run_health.md with these:
min LR above the peak (models/config.py), a global batch larger than the training split
(data/dataset.py), a validation split under 2 bytes (utils/train/validation.py).
"""

from __future__ import annotations

from models.config import Config
from models.config_checks import ConfigError


def start_warnings(cfg: Config, val_shard_sizes: list[int], steps_per_epoch: int) -> list[str]:
    """One line per setting that wastes the run; raises ConfigError for one that defeats it."""
    t, m = cfg.train, cfg.model
    steps = t.max_steps
    if t.stop_at_step > steps:
        raise ConfigError(f"train.stop_at_step={t.stop_at_step} is after train.max_steps={steps}, so it is never "
                          f"reached; lower it or set train.stop_at_step=0")
    out = []
    if cfg.schedule.warmup_steps >= steps:
        out.append(f"schedule.warmup_steps={cfg.schedule.warmup_steps} is not shorter than train.max_steps={steps}: "
                   f"the LR never reaches optim.lr; lower the warmup")
    for key, every, what in (("eval.every", cfg.eval.every, "only the final evaluation runs"),
                             ("checkpoint.every", cfg.checkpoint.every, "only the final checkpoint is saved"),
                             ("train.log_every", t.log_every, "only the last step is logged")):
        if every > steps:
            out.append(f"{key}={every} is longer than the run (train.max_steps={steps}): {what}")
    if val_shard_sizes and max(val_shard_sizes) < m.context_length + 1:
        out.append(f"model.context_length={m.context_length} is longer than every validation shard (largest "
                   f"{max(val_shard_sizes):,} bytes): each evaluated window spans shards (or the split is shorter "
                   f"than one window); prepare larger validation shards")
    if steps > 100 * steps_per_epoch:
        out.append(f"train.max_steps={steps} passes over the training split {steps // steps_per_epoch} times "
                   f"({steps_per_epoch} steps per epoch): the model will memorise it; prepare more text")
    return [f"warning: {line}" for line in out]

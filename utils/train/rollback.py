"""The in-memory snapshot a `health.action=rollback` run returns to.

Why memory and not the last checkpoint: a checkpoint may be far back (checkpoint.every is 1000 steps
by default, 0 in the recipes: the end only), reloading it costs a disk read per rollback, and a
sharded checkpoint would need every rank to reload. A snapshot every `health.snapshot_every` steps
bounds the lost work to that many steps, for the price of one copy of the weights and optimizer
state in host memory (each rank copies only its own shards under FSDP), taken off the device on
CUDA so it costs no GPU memory.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from utils.checkpoint import format as ckpt


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns: an FSDP2 DTensor's shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _copy_out(t: torch.Tensor) -> torch.Tensor:
    return _local(t.detach()).to("cpu", copy=True)


class Snapshot:
    """Weights, optimizer state and hyperparameters, LR schedule, loss scaler and RNG at a step boundary."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 trainer_state: dict) -> None:
        with torch.no_grad():
            self.params = [_copy_out(p) for p in model.parameters()]
            self.opt_state = [{k: _copy_out(v) if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                              for g in optimizer.param_groups for p in g["params"]]
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.scheduler = copy.deepcopy(scheduler.state_dict())
        self.scaler = copy.deepcopy(scaler.state_dict())
        self.rng = ckpt.rng_state()
        self.trainer_state = copy.deepcopy(trainer_state)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> dict:
        """Put everything back in place (tensors copied into the live ones); returns the trainer state."""
        with torch.no_grad():
            for p, saved in zip(model.parameters(), self.params):
                _local(p.detach()).copy_(saved)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            for p, saved in zip(params, self.opt_state):
                live = optimizer.state[p]
                if not saved:  # no update had touched it yet: the optimizer creates it afresh
                    optimizer.state.pop(p, None)
                    continue
                for k, v in saved.items():
                    if torch.is_tensor(v):
                        _local(live[k]).copy_(v)
                    else:
                        live[k] = v
        for g, saved in zip(optimizer.param_groups, self.groups):
            g.update(saved)
        scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        scaler.load_state_dict(copy.deepcopy(self.scaler))
        ckpt.set_rng_state(self.rng)
        return copy.deepcopy(self.trainer_state)

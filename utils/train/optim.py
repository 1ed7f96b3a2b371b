"""Optimizers and the learning-rate schedule.

AdamW decays matrices only (biases and norm gains are not decayed). Muon (Jordan et al. 2024,
"Muon: An optimizer for hidden layers in neural networks") orthogonalises the momentum of each
hidden 2-D weight matrix with a Newton-Schulz iteration; embeddings, the head, biases and gains
stay on AdamW, inside the same optimizer so one scheduler, scaler and state_dict serve both.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from models.config import OptimConfig, ScheduleConfig
from utils.device import fused_adamw
from utils.distributed.parallel import local_part


def lr_at(step: int, cfg: ScheduleConfig, peak_lr: float, max_steps: int) -> float:
    """Learning rate for the optimizer step with 0-based index `step`."""
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.name == "wsd":  # warmup, stable, then linear decay (Hägele et al. 2024)
        decay_start = max(cfg.warmup_steps, int(max_steps * (1 - cfg.cooldown_frac)))
        if step < decay_start:
            return peak_lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return peak_lr + progress * (cfg.min_lr - peak_lr)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - cfg.min_lr)


def newton_schulz(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately orthogonalise G (the U V^T of its SVD), or each matrix of a stack [n, rows, cols],
    in bf16 as the published Muon does (fp32 where the run trains in fp32: CPUs without bf16 units run
    bf16 matmuls several times slower).

    The quintic coefficients push singular values into roughly [0.7, 1.2] in few steps rather
    than converging exactly to 1, which is all the update needs.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    single = X.dim() == 2
    if single:
        X = X.unsqueeze(0)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    if tall:
        X = X.mT
    return X[0] if single else X


# elements in one stack of matrices (64 MiB in fp32): under FSDP every rank gathers a whole stack at once
STACK_ELEMENTS = 1 << 24


def stacks(shapes: list[torch.Size], cap: int = STACK_ELEMENTS) -> list[list[int]]:
    """Indices of the same-shaped matrices, in stacks of at most `cap` elements (or one matrix)."""
    by_shape: dict[torch.Size, list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(i)
    per_stack = {shape: max(1, cap // shape.numel()) for shape in by_shape}
    return [index[k:k + per_stack[shape]] for shape, index in by_shape.items()
            for k in range(0, len(index), per_stack[shape])]


def orthogonalised(updates: list[Tensor], steps: int, dtype: torch.dtype) -> list[Tensor]:
    """newton_schulz of each matrix in a list of same-shaped ones, as one stack: fewer, larger kernels
    (the CPU recipe's optimizer step went from 24.5 to 19.8 ms, docs/benchmarks.md).

    Orthogonalisation needs the whole matrix, so an FSDP shard (a DTensor) is gathered first; every
    rank then holds the same full update and keeps only its own shard of it.
    """
    full = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in updates]
    return [local_part(o, g) for o, g in zip(newton_schulz(torch.stack(full), steps, dtype).unbind(), updates)]


def _local(t: Tensor) -> Tensor:
    """The part this rank holds: an FSDP2 DTensor's shard (elementwise updates need no more), or t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class Muon(torch.optim.Optimizer):
    """Muon for param groups with muon=True, AdamW for the others; each group's tensors are updated
    together with torch._foreach_* ops (one kernel per operation, not one per parameter).

    Like torch's fused AdamW, it takes `found_inf` (a device scalar, set by step_unless): where it is
    non-zero the step changes nothing, decided on the device, so the host never has to read it."""

    def __init__(self, groups: list[dict], lr: float, momentum: float, betas: tuple[float, float],
                 adam_lr: float, ns_steps: int = 5, eps: float = 1e-8,
                 ns_dtype: torch.dtype = torch.bfloat16) -> None:
        self.ns_dtype = ns_dtype
        self.found_inf: Tensor | None = None
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, ns_steps=ns_steps, weight_decay=0.0)
        for g in groups:
            g.setdefault("lr", lr if g["muon"] else adam_lr)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = _local(params[0]).device
            found_inf = self.found_inf if self.found_inf is not None else torch.zeros((), device=device)
            ok = 1 - found_inf.float()  # 1: apply, 0: leave everything as it is
            skip = found_inf.bool()
            grads = [_local(p.grad) for p in params]
            for g in grads:  # a skipped step's gradients may be inf or NaN, which no multiplier by 0 removes
                g.masked_fill_(skip, 0)
            if group["weight_decay"]:
                torch._foreach_mul_([_local(p) for p in params], 1 - group["lr"] * group["weight_decay"] * ok)
            (self._muon if group["muon"] else self._adamw)(group, params, [p.grad for p in params], ok)

    def _muon(self, group: dict, params: list[Tensor], grads: list[Tensor], ok: Tensor) -> None:
        for p in params:
            if "momentum_buffer" not in self.state[p]:  # not setdefault: its zeros would be allocated every step
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        local_bufs = [_local(b) for b in bufs]
        torch._foreach_add_(local_bufs, torch._foreach_mul(torch._foreach_sub([_local(g) for g in grads], local_bufs),
                                                           (1 - group["momentum"]) * ok))  # lerp, masked
        updates = torch._foreach_lerp(grads, bufs, group["momentum"])  # Nesterov
        for index in stacks([p.shape for p in params]):
            rows, cols = params[index[0]].shape[-2:]
            scale = max(1.0, rows / cols) ** 0.5  # the update's RMS does not shrink for tall matrices
            ortho = orthogonalised([updates[i] for i in index], group["ns_steps"], self.ns_dtype)
            torch._foreach_add_([_local(params[i]) for i in index],
                                torch._foreach_mul([_local(o).to(params[i].dtype) for o, i in zip(ortho, index)],
                                                   -group["lr"] * scale * ok))

    def _adamw(self, group: dict, params: list[Tensor], grads: list[Tensor], ok: Tensor) -> None:
        states = [self.state[p] for p in params]
        for state, p in zip(states, params):
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32, device=ok.device),
                             exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            elif state["step"].device != ok.device:  # loaded from a checkpoint: optimizers keep steps on the CPU
                state["step"] = state["step"].to(ok.device)
        beta1, beta2 = group["betas"]
        grads = [_local(g) for g in grads]
        exp_avg = [_local(s["exp_avg"]) for s in states]
        exp_avg_sq = [_local(s["exp_avg_sq"]) for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, ok)
        torch._foreach_add_(exp_avg, torch._foreach_mul(torch._foreach_sub(grads, exp_avg), (1 - beta1) * ok))
        torch._foreach_mul_(exp_avg_sq, 1 - (1 - beta2) * ok)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)  # the gradients of a skipped step are 0
        t = steps[0].clamp(min=1)  # every tensor of a group is updated together; a skipped first step is step 0
        denom = torch._foreach_div(exp_avg_sq, 1 - beta2 ** t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(exp_avg, denom)
        torch._foreach_add_([_local(p) for p in params], torch._foreach_mul(updates, -group["lr"] / (1 - beta1 ** t) * ok))


def step_unless(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """optimizer.step(), or no change at all where `skip` (a device bool) is set, decided on the device as
    GradScaler does it: fused AdamW and Muon take it as `found_inf`. Another optimizer (foreach AdamW, where
    the fused kernel is missing) has the host read it."""
    if isinstance(optimizer, Muon) or optimizer.defaults.get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()  # grads are unscaled already (unscale_)
        optimizer.step()
    elif not skip:
        optimizer.step()


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    precision: str = "bf16") -> torch.optim.Optimizer:
    """precision: the run's resolved train.precision; Muon's orthogonalisation follows it."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    hidden = {id(p) for block in model.blocks for p in block.parameters() if p.dim() == 2}
    if cfg.name == "muon":
        groups = [
            dict(params=[p for p in matrices if id(p) in hidden], muon=True, weight_decay=0.0),
            dict(params=[p for p in matrices if id(p) not in hidden], muon=False, weight_decay=cfg.weight_decay),
            dict(params=vectors, muon=False, weight_decay=0.0),
        ]
        return Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2),
                    adam_lr=cfg.lr, ns_dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
    groups = [dict(params=matrices, weight_decay=cfg.weight_decay), dict(params=vectors, weight_decay=0.0)]
    if cfg.base_width:  # Adam's update of a hidden matrix moves its output in proportion to fan-in: rate / width
        groups.insert(0, dict(params=[p for p in matrices if id(p) in hidden], weight_decay=cfg.weight_decay,
                              lr=cfg.lr * cfg.base_width / model.cfg.dim))
        groups[1]["params"] = [p for p in matrices if id(p) not in hidden]
    # one fused kernel over all tensors; on CPU (torch 2.4+) it cut AdamW's time 4x (docs/benchmarks.md)
    fused = cfg.fused and fused_adamw(device)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, peak_lr: float,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group follows lr_at, scaled to its own base lr (Muon's and AdamW's differ)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, peak_lr, max_steps) / peak_lr)

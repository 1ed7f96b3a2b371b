"""Memory per rank of a training run, predicted from shapes alone, before anything is allocated.

The parameters come from the GPT built on the meta device; the activations from its real forward
pass run on fake tensors (FakeTensorMode: shapes, dtypes and storages, no memory), with
`saved_tensors_hooks` recording every tensor autograd keeps for backward. So the count follows the
model code as it is (autocast copies, dropout masks, the attention kernel's choice, activation
checkpointing) rather than a formula that can drift from it.

The peak per rank is the largest of three moments of a step, after the first step has created the
optimizer state (W weights, O optimizer state, G gradients, per rank):
- early in backward: W + O + kept G + every saved activation + the loss gradient (two fp32
  (B, T, vocab) tensors) or a block's backward (its widest activation gradient; checkpointed, its
  recomputed activations);
- the last block's backward: W + O + every gradient but that block's + its activations, which is
  the peak under activation checkpointing;
- the optimizer step: W + O + G + Muon's temporaries (a few copies of its largest matrix).
"Kept G" is gradient memory that lives across steps: DDP's buckets, and every gradient when
micro-batches accumulate. FSDP adds what it gathers during backward: the root's parameters
(embeddings, final norm, head; not resharded between forward and backward), the block being
computed and the next one it prefetches, and that block's unsharded gradient. This is FSDP built
on the meta device, each rank materialising only its shards; a rank that first builds the whole
model peaks at least at its fp32 weights at start-up. Tensor bytes only: a CPU allocator that keeps
freed memory resident adds to it (dev/plan_check.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.config import Config, ModelConfig
from models.transformer import GPT
from utils.precision import DTYPES, autocast_context

FP32 = 4


def meta_model(cfg: ModelConfig) -> GPT:
    """The GPT with every tensor on the meta device: exact shapes, no memory."""
    with torch.device("meta"):
        return GPT(cfg)


def shard_numel(p: torch.Tensor, world_size: int) -> int:
    """Elements one FSDP2 rank holds of p: dim 0 cut into world_size chunks, each padded to the largest."""
    if p.dim() == 0:
        return 1
    return math.ceil(p.shape[0] / world_size) * (p.numel() // p.shape[0])


def unique_params(module: nn.Module) -> list[torch.Tensor]:
    return list({id(p): p for p in module.parameters()}.values())  # the tied head counts once


def count_saved_bytes(cfg: ModelConfig, batch: int, device: torch.device, precision: str, checkpointing: bool,
                      param_dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(inside the blocks, outside them): bytes autograd saves for backward in one training forward of
    `batch` sequences, parameters excluded, each storage once however many views of it are saved.
    param_dtype bf16: the weights are bf16 already, as FSDP's gathered ones, so autocast saves no copy."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # private, but present in every torch >= 2.1

    with FakeTensorMode():
        default = torch.get_default_dtype()
        torch.set_default_dtype(param_dtype)  # Module.to cannot swap fake parameters; build them in it
        try:
            with torch.device(device.type):
                model = GPT(cfg)
        finally:
            torch.set_default_dtype(default)
        model.train()
        model.activation_checkpointing = checkpointing
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        saved: dict[int, tuple[bool, int]] = {}
        keep = []  # a freed storage's address can be reused; holding them keeps each key unique
        inside = [False]
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
            block.register_forward_hook(lambda *_: inside.__setitem__(0, False))

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in params and storage._cdata not in saved:
                saved[storage._cdata] = (inside[0], storage.nbytes())
                keep.append(storage)
            return t

        idx = torch.zeros(batch, cfg.context_length, dtype=torch.long, device=device.type)
        # a checkpointed block saves its input in the checkpoint call, just outside the block's hooks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(device, precision):
            model(idx, idx.clone())
    blocks = sum(n for in_block, n in saved.values() if in_block)
    return blocks, sum(n for _, n in saved.values()) - blocks


@dataclass(frozen=True)
class Activations:
    """Saved bytes as a function of the micro-batch: fixed + per_sequence * batch."""
    per_sequence: int
    fixed: int

    def at(self, batch: int) -> int:
        return self.fixed + self.per_sequence * batch


def activations(cfg: ModelConfig, device: torch.device, precision: str,
                param_dtype: torch.dtype) -> tuple[Activations, ...]:
    """(inside the blocks, outside them, outside them under checkpointing), each counted at one and two
    sequences: every saved tensor but a few constants scales with the batch. Under checkpointing
    nothing inside a block is kept; its input is saved by the checkpoint call, outside it."""
    def fit(one: int, two: int) -> Activations:
        return Activations(per_sequence=two - one, fixed=2 * one - two)

    (blocks1, out1), (blocks2, out2) = (count_saved_bytes(cfg, b, device, precision, False, param_dtype)
                                        for b in (1, 2))
    (_, ck1), (_, ck2) = (count_saved_bytes(cfg, b, device, precision, True, param_dtype) for b in (1, 2))
    return fit(blocks1, blocks2), fit(out1, out2), fit(ck1, ck2)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank; everything a user needs to decide whether a run fits."""
    parameters: int
    """in the model, a tied weight once"""
    parameters_per_rank: int
    weights: int
    gradients: int
    block_gradients: int
    """the largest block's share of `gradients`"""
    optimizer_state: int
    ddp_buckets: int
    """DDP's bucket memory beyond the gradients (0 when the gradients are views into the buckets)"""
    fsdp_gathered: int
    """FSDP: the root's and two blocks' unsharded parameters plus one block's unsharded gradient"""
    optimizer_temporary: int
    gradients_kept: bool
    """whether gradient memory lives through the forward pass (DDP buckets, or accumulation)"""
    saved_blocks: Activations
    saved_outside: Activations
    saved_outside_checkpointed: Activations
    n_layers: int
    loss_gradient_per_sequence: int
    """the gradient of the fp32 log-softmax and of its input, (T, vocab) each"""
    block_gradient_per_sequence: int
    """the widest activation gradient inside a block's backward: (T, MLP width) in the compute dtype"""
    checkpointing: bool
    """train.activation_checkpointing, what the figures assume unless told otherwise"""

    def _ac(self, checkpointing: bool | None) -> bool:
        return self.checkpointing if checkpointing is None else checkpointing

    def saved_bytes(self, batch: int, checkpointing: bool | None = None) -> int:
        """What autograd keeps from the forward of one micro-batch until its backward."""
        if self._ac(checkpointing):
            return self.saved_outside_checkpointed.at(batch)
        return self.saved_blocks.at(batch) + self.saved_outside.at(batch)

    def activation_bytes(self, batch: int, checkpointing: bool | None = None) -> int:
        """Activation memory of one micro-batch early in backward, when all of it is still saved: plus
        the loss gradient, or plus a block's backward (its gradient and, checkpointed, its recomputed
        activations)."""
        ac = self._ac(checkpointing)
        recomputed = self.saved_blocks.at(batch) // self.n_layers if ac else 0
        return self.saved_bytes(batch, ac) + max(self.loss_gradient_per_sequence * batch,
                                                 recomputed + self.block_gradient_per_sequence * batch)

    def last_block_bytes(self, batch: int) -> int:
        """Activation memory in the first block's backward, the last one: its saved activations (or, checkpointed,
        its input and recomputed ones) and its gradient."""
        one_input = (self.saved_outside_checkpointed.at(batch) - self.saved_outside.at(batch)) // self.n_layers
        return self.saved_blocks.at(batch) // self.n_layers + one_input + self.block_gradient_per_sequence * batch

    def peak_bytes(self, batch: int, checkpointing: bool | None = None) -> int:
        """The largest of: early backward (all activations, kept gradients), the last block's backward
        (nearly every gradient, one block's activations), and the optimizer step (every gradient)."""
        state = self.weights + self.optimizer_state + self.ddp_buckets
        kept = self.gradients if self.gradients_kept else 0
        early = state + self.fsdp_gathered + kept + self.activation_bytes(batch, checkpointing)
        late = state + self.fsdp_gathered + max(kept, self.gradients - self.block_gradients) \
            + self.last_block_bytes(batch)
        optimizer_step = state + self.gradients + self.optimizer_temporary
        return max(early, late, optimizer_step)

    def largest_batch(self, memory: int, checkpointing: bool | None = None) -> int:
        """The largest micro-batch whose peak fits in `memory` bytes; 0 when not even one sequence does."""
        if self.peak_bytes(1, checkpointing) > memory:
            return 0
        low, high = 1, 2
        while self.peak_bytes(high, checkpointing) <= memory:  # the peak grows with the batch
            low, high = high, 2 * high
        while high - low > 1:  # peak(low) fits, peak(high) does not
            mid = (low + high) // 2
            low, high = (mid, high) if self.peak_bytes(mid, checkpointing) <= memory else (low, mid)
        return low

def optimizer_bytes(model: GPT, name: str, local: dict[int, int]) -> tuple[int, int]:
    """(state, step temporaries) in bytes for utils/train/optim.py's optimizer: AdamW keeps two fp32
    moments and a step count per tensor; Muon one momentum per hidden matrix, AdamW's for the rest."""
    params = unique_params(model)
    muon = {id(p) for block in model.blocks for p in block.parameters() if p.dim() == 2} if name == "muon" else set()
    state = sum(FP32 * local[id(p)] if id(p) in muon else 2 * FP32 * local[id(p)] + FP32 for p in params)
    # Muon: the Nesterov mix, the orthogonalisation's iterate and its products, of the full matrix
    # (FSDP gathers it); its AdamW part: a square and a denominator of one tensor at a time
    largest_muon = max((p.numel() for p in params if id(p) in muon), default=0)
    largest = max(local[id(p)] for p in params)
    temporary = (6 * FP32 * largest_muon + 2 * FP32 * largest) if name == "muon" else 0
    return state, temporary


def fsdp_gathered_bytes(model: GPT, precision: str) -> int:
    """What FSDP2 unshards at the busiest moment of backward: the root's parameters, the current and
    the prefetched block in the compute dtype, and the current block's gradient (computed in that
    dtype, reduced in fp32)."""
    compute = 2 if precision == "bf16" else FP32
    blocks = {id(p) for p in model.blocks.parameters()}
    root = sum(p.numel() for p in unique_params(model) if id(p) not in blocks)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    gradient = block * (FP32 + (compute if compute != FP32 else 0))
    return compute * (root + 2 * block) + gradient


def plan_memory(cfg: Config, world_size: int, device: torch.device, precision: str) -> MemoryPlan:
    """The memory plan of `cfg` on `world_size` ranks of `device`; precision is resolved (not auto)."""
    model = meta_model(cfg.model)
    params = unique_params(model)
    fsdp = cfg.distributed.sharded and world_size > 1
    ddp = cfg.distributed.strategy == "ddp" and world_size > 1
    local = {id(p): shard_numel(p, world_size) if fsdp else p.numel() for p in params}
    per_rank = sum(local.values())
    state, temporary = optimizer_bytes(model, cfg.optim.name, local)
    block_params = max(sum(local[id(p)] for p in block.parameters()) for block in model.blocks)
    m = cfg.model
    width = 2 * m.ffn_dim if m.activation == "swiglu" else m.ffn_dim
    # FSDP's bf16 policy gathers the weights in bf16 (utils/distributed/parallel.py)
    gathered_dtype = torch.bfloat16 if fsdp and precision == "bf16" else torch.float32
    return MemoryPlan(
        parameters=sum(p.numel() for p in params), parameters_per_rank=per_rank,
        weights=FP32 * per_rank, gradients=FP32 * per_rank, block_gradients=FP32 * block_params,
        optimizer_state=state,
        ddp_buckets=FP32 * per_rank if ddp and not cfg.distributed.gradient_as_bucket_view else 0,
        fsdp_gathered=fsdp_gathered_bytes(model, precision) if fsdp else 0,
        optimizer_temporary=temporary, gradients_kept=ddp or cfg.train.grad_accum_steps > 1,
        **dict(zip(("saved_blocks", "saved_outside", "saved_outside_checkpointed"),
                   activations(m, device, precision, gathered_dtype))), n_layers=m.n_layers,
        loss_gradient_per_sequence=2 * FP32 * m.context_length * m.vocab_size,
        block_gradient_per_sequence=DTYPES[precision].itemsize * m.context_length * width,
        checkpointing=cfg.train.activation_checkpointing)

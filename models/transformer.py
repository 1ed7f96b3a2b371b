"""A decoder-only GPT over bytes, written from scratch, with a KV cache for generation.

Baseline is GPT-2 (Radford et al. 2019): learned positions, pre-norm LayerNorm blocks, GELU MLP,
tied LM head. Options from later work, each switched in ModelConfig: rotary embeddings (Su et al.
2021), RMSNorm (Zhang & Sennrich 2019), QK-norm (Dehghani et al. 2023), ReLU² (So et al. 2021),
SwiGLU (Shazeer 2020).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.config import ModelConfig
from models.init import Place, init_parameters, whole


def rms_norm_fp32(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """In fp32, weight included, as autocast runs the block norms: FSDP's bf16 gathers hand the norm a
    bf16 weight, which beside an fp32 input misses the fused kernel (and torch warns)."""
    return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-5)
    return nn.LayerNorm(dim, eps=1e-5, bias=cfg.bias)


def rope_tables(head_dim: int, length: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (length, head_dim) for the rotate-half convention (as GPT-NeoX, Llama)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, dropout_p: float) -> Tensor:
    """SDPA; on a CPU always in fp32, also inside bf16/fp16 autocast: the CPU flash kernel's forward
    + backward ran 1.1 to 5x slower in bf16 than in fp32 at every shape measured (docs/benchmarks.md)."""
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p)
    with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs straight back
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=is_causal, dropout_p=dropout_p)
    return y.to(q.dtype)


class KVCache(nn.Module):
    """Keys and values of past positions, preallocated for one generation call."""

    def __init__(self, batch: int, n_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch, n_heads, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v at positions [pos, pos + T) and return everything up to there."""
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.dim, self.dropout = cfg.n_heads, cfg.dim, cfg.dropout
        self.head_dim = cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if cfg.qk_norm else None
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, pos: int) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.dim, dim=2)
        # (B, T, C) -> (B, n_heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:  # back to the matmuls' dtype for attention
            q, k = rms_norm_fp32(self.q_norm, q).to(v.dtype), rms_norm_fp32(self.k_norm, k).to(v.dtype)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)
        # SDPA's is_causal aligns the mask top-left, which is only right when queries and keys
        # start together (training, prefill). A decode step's single query sees every cached key.
        y = attention(q, k, v, is_causal=T > 1, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_heads, T, head_dim) -> (B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation, self.dropout = cfg.activation, cfg.dropout
        width = 2 * cfg.ffn_dim if cfg.activation == "swiglu" else cfg.ffn_dim
        self.fc = nn.Linear(cfg.dim, width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return F.dropout(self.proj(h), self.dropout, self.training)


class Block(nn.Module):
    """ pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)) """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg, cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, pos: int) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, pos)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """seed: of the initial weights, which depend on it alone (models/init.py), not on torch's global generator."""

    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.dim) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg, cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_emb == "rope":  # not saved: computed by init_weights, fp32 whatever the default dtype
            shape = (cfg.context_length, cfg.dim // cfg.n_heads)
            self.register_buffer("rope_cos", torch.empty(shape, dtype=torch.float32), persistent=False)
            self.register_buffer("rope_sin", torch.empty(shape, dtype=torch.float32), persistent=False)
        if not self.tok_emb.weight.is_meta:  # a build on the meta device has no storage yet: init_weights later
            self.init_weights(seed)

    def init_distributions(self) -> dict[Tensor, tuple[float, float]]:
        """Each parameter's initial (mean, std), GPT-2's init (Radford et al. 2019): N(0, 0.02) for every
        linear weight and embedding table, biases 0 and norm gains 1."""
        start = {}
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                start[m.weight] = (0.0, 0.02)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                start[m.weight] = (1.0, 0.0)
            if getattr(m, "bias", None) is not None:
                start[m.bias] = (0.0, 0.0)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers), one pair per block
        proj_std = 0.0 if self.cfg.zero_init_proj else 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                start[proj.weight] = (0.0, proj_std)
        return start

    def init_weights(self, seed: int, place: Place = whole) -> None:
        """Every parameter from (seed, its name) (models/init.py), and the RoPE tables. Called by the constructor,
        and after `to_empty` for a model built on the meta device (FSDP: place keeps each rank's shard)."""
        init_parameters(self, self.init_distributions(), seed, place)
        if self.pos_emb is None:
            cos, sin = rope_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.context_length, self.cfg.rope_base)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (shared ones once); non_embedding drops the lookup tables, as for FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
            n -= 0 if self.cfg.tie_embeddings else self.tok_emb.weight.numel()
        return n

    def forward(self, idx: Tensor, targets: Tensor | None = None, pos: int = 0) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for tokens at positions [pos, pos + T); mean loss if targets given.

        Targets of -1 are ignored. pos > 0 only when a KV cache holds the earlier positions.
        """
        B, T = idx.shape
        if pos + T > self.cfg.context_length:
            raise ValueError(f"sequence of {pos + T} tokens exceeds context_length {self.cfg.context_length}")
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device))
        else:
            rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T])
        x = self.drop(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, pos, use_reentrant=False)
            else:
                x = block(x, rope, pos)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _set_cache(self, batch: int, dtype: torch.dtype | None) -> None:
        for block in self.blocks:
            attn = block.attn
            attn.cache = None if dtype is None else KVCache(
                batch, attn.n_heads, self.cfg.context_length, attn.head_dim, dtype, self.tok_emb.weight.device)

    @torch.inference_mode()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> Iterator[Tensor]:
        """Yield (B,) next tokens one step at a time, continuing idx (B, T).

        Args:
            temperature: 0 picks the most likely token (greedy).
            use_cache: False recomputes the whole window every step (the reference for tests).
        The model sees at most context_length tokens. Past that the window slides by half a
        context at a time and the cache is rebuilt from the kept half, so a long generation costs
        one prefill per half-context instead of one full forward per token.
        """
        ctx = self.cfg.context_length
        start = max(0, idx.size(1) - ctx)  # first token of the current window
        cached = 0  # tokens of the window already in the cache
        if use_cache:
            self._set_cache(idx.size(0), self.tok_emb.weight.dtype)
        try:
            for _ in range(max_new_tokens):
                if idx.size(1) - start > ctx:
                    start = idx.size(1) - max(1, ctx // 2)  # context_length 1 would keep no token
                    cached = 0
                if use_cache:
                    logits, _ = self(idx[:, start + cached:], pos=cached)
                    cached = idx.size(1) - start
                else:
                    logits, _ = self(idx[:, start:])
                token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
                idx = torch.cat([idx, token[:, None]], dim=1)
                yield token
        finally:
            self._set_cache(0, None)


def filter_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Scale by temperature, then keep the top_k tokens and the smallest nucleus of mass >= top_p."""
    # In float64 (a temperature of 1e-300 is 0 in float32) with the maximum shifted to 0: a tiny
    # temperature then sends the others to -inf (the greedy limit) instead of inf - inf = NaN.
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """(B, vocab) logits -> (B,) tokens; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

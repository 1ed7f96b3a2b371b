"""Text out of a byte-level model: a prompt's bytes in, UTF-8 text streamed out a character at a
time, samples ended by stop strings. Used by inference.py; the sampling itself (temperature,
top-k, top-p, KV cache) is GPT.generate."""

from __future__ import annotations

import codecs
from collections.abc import Callable

import torch
import torch.nn as nn

from utils.device import free_memory
from utils.errors import UserError


def check_sampling_fits(model: nn.Module, prompt_len: int, max_new_tokens: int, num_samples: int) -> None:
    """Refuse a request whose batch cannot be held, before any of it is allocated: per sample the KV
    cache (keys and values of every layer over the context), the prefill's activations and logits over
    one context window, and the token ids of prompt and continuation."""
    cfg, dtype_bytes = model.cfg, model.tok_emb.weight.element_size()
    window = min(cfg.context_length, prompt_len + max_new_tokens)
    per_sample = (2 * cfg.n_layers * cfg.context_length * cfg.dim * dtype_bytes
                  + window * (4 * cfg.dim + cfg.ffn_dim + cfg.vocab_size) * 4 + 8 * (prompt_len + max_new_tokens))
    need, free = num_samples * per_sample, free_memory(model.tok_emb.weight.device)
    if need > free:
        raise UserError(f"{num_samples:,} samples of {prompt_len + max_new_tokens:,} tokens need ~{need / 2**30:,.1f} "
                        f"GiB, more than the {free / 2**30:.1f} GiB free; ask for fewer --num-samples or "
                        f"--max-new-tokens")



class TextStream:
    """One sample's bytes in, printable text out, ending just before the first stop string.

    UTF-8 is decoded incrementally: the bytes of an incomplete character wait for the rest and
    invalid bytes become U+FFFD, so no broken character is ever printed. Text that may be the
    start of a stop string is held back until it cannot be.
    """

    def __init__(self, stops: list[str], prompt: bytes = b"") -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops, self.pending, self.text, self.tokens, self.done = stops, "", "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.echo = self.decoder.decode(prompt)  # the prompt's own text; a split last character waits

    def push(self, data: bytes, final: bool = False) -> str:
        """New bytes in (final: no more will come); the text that is now safe to print."""
        if self.done:
            return ""
        self.tokens += len(data)
        self.pending += self.decoder.decode(data, final)
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.done = True
            cut = min(hits)
        else:
            cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], "" if self.done else self.pending[cut:]
        self.text += out
        return out


def generate_text(model: nn.Module, prompt: bytes, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, num_samples: int = 1,
                  seed: int | None = None, stops: list[str] | None = None,
                  write: Callable[[str], None] | None = None) -> tuple[list[str], int]:
    """Continue prompt in num_samples samples generated as one batch.

    Returns the continuations and the number of tokens they took (a stop string ends a sample
    early). Sample 0 streams through `write`, prompt first, as its characters complete.
    """
    check_sampling_fits(model, len(prompt), max_new_tokens, num_samples)
    device = model.tok_emb.weight.device
    idx = torch.tensor([list(prompt)] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    streams = [TextStream(stops or [], prompt) for _ in range(num_samples)]
    emit = write or (lambda s: None)
    emit(streams[0].echo)
    for tokens in model.generate(idx, max_new_tokens, temperature, top_k, top_p, generator):
        outs = [stream.push(bytes([token])) for stream, token in zip(streams, tokens.tolist())]
        emit(outs[0])
        if all(s.done for s in streams):
            break
    tails = [stream.push(b"", final=True) for stream in streams]
    emit(tails[0])
    return [s.text for s in streams], sum(s.tokens for s in streams)

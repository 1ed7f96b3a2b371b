"""Sample text from a trained checkpoint, streaming it to stdout as it is generated.

    python inference.py --checkpoint checkpoints/best_model.pt --prompt "Once upon a time"
    python inference.py --prompt "def " --temperature 0 --max-new-tokens 100       # greedy
    echo "ROMEO:" | python inference.py --prompt - --num-samples 3 --top-p 0.9 --seed 1
    python inference.py --prompt-file prompt.txt --stop "\n\n" --top-k 40

Any checkpoint written by training loads here (single process, DDP or compiled), on the CPU
when no GPU is present. The prompt is encoded to UTF-8 bytes, the model's tokens; the output is
UTF-8 text, printed a character at a time as its bytes arrive. A summary with tokens per second
goes to stderr.
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.transformer import GPT
from utils.checkpoint import build_model, load_checkpoint
from utils.device import DEVICE_CHOICES, resolve_device
from utils.errors import ArgumentParser, UserError, run_cli
from utils.precision import DTYPES, sampling_precision

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


def generate_text(model: GPT, prompt: bytes, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, num_samples: int = 1,
                  seed: int | None = None, stops: list[str] | None = None,
                  write: Callable[[str], None] | None = None) -> tuple[list[str], int]:
    """Continue prompt in num_samples samples generated as one batch.

    Returns the continuations and the number of tokens they took (a stop string ends a sample
    early). Sample 0 streams through `write`, prompt first, as its characters complete.
    """
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


def escaped(s: str) -> str:
    """Interpret backslash escapes ("\\n\\n" -> two newlines) and keep every other character."""
    try:
        return s.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise UserError(f"--stop {s!r} has a broken backslash escape ({e.reason}); write a backslash as \\\\") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Sample from a trained byte-level GPT.")
    p.add_argument("--checkpoint", default="checkpoints/best_model.pt")
    p.add_argument("--prompt", default=None, help="text to continue; '-' reads stdin")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1, help="generated together as one batch")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text (on the same device)")
    p.add_argument("--stop", nargs="+", action="extend", default=[],
                   help="end a sample before any of these strings; backslash escapes like \\n work")
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto: CUDA, then MPS, then CPU)")
    p.add_argument("--precision", choices=["auto", *DTYPES], default="auto",
                   help="default auto: the precision the checkpoint was trained in (fp32 for fp16 on a CPU)")
    args = p.parse_args(argv)
    if not (0 <= args.temperature < math.inf) or args.max_new_tokens < 0 or args.num_samples < 1:
        raise UserError(f"--temperature must be a finite number >= 0 (got {args.temperature}), --max-new-tokens "
                        f">= 0 and --num-samples >= 1")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # also refuses NaN
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p})")
    args.stop = [escaped(s) for s in args.stop]
    if "" in args.stop:
        raise UserError("--stop strings must not be empty")
    return args


def read_prompt(args: argparse.Namespace) -> bytes:
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
    elif args.prompt == "-":
        prompt = sys.stdin.buffer.read()
    else:  # surrogateescape gives back the exact bytes of an argument that is not valid UTF-8
        prompt = (args.prompt or "").encode("utf-8", errors="surrogateescape")
    if not prompt:
        raise UserError("the prompt is empty; give text with --prompt TEXT, --prompt-file FILE or --prompt - (stdin)")
    return prompt


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(argv)
        prompt = read_prompt(args)
        device = resolve_device(args.device, 0)
        state = load_checkpoint(args.checkpoint)
        precision = sampling_precision(args.precision, state, device)
        model = build_model(state, args.checkpoint, device, DTYPES[precision])
        out = sys.stdout
        if hasattr(out, "reconfigure"):
            out.reconfigure(encoding="utf-8")  # the model writes UTF-8, whatever the locale says
        stream = (lambda s: (out.write(s), out.flush())) if args.num_samples == 1 else None
        t0 = time.perf_counter()
        texts, n_tokens = generate_text(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                                        args.top_p, args.num_samples, args.seed, args.stop, stream)
        elapsed = time.perf_counter() - t0
        if stream:
            out.write("\n")
        else:
            echo = TextStream([], prompt).echo
            for i, text in enumerate(texts):
                out.write(f"--- sample {i + 1} ---\n{echo}{text}\n")
        out.flush()
        print(f"[{n_tokens} tokens in {args.num_samples} sample(s) in {elapsed:.2f} s, "
              f"{n_tokens / elapsed:,.0f} tokens/s, {device.type} {precision}]", file=sys.stderr)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

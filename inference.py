"""Sample text from a trained checkpoint, streaming it to stdout as it is generated.

    python inference.py --checkpoint checkpoints/best_model.pt --prompt "Once upon a time"
    python inference.py --prompt "def " --temperature 0 --max-new-tokens 100       # greedy
    echo "ROMEO:" | python inference.py --prompt - --num-samples 3 --top-p 0.9 --seed 1
    python inference.py --prompt-file prompt.txt --stop "\n\n" --top-k 40

Any checkpoint written by training loads here (single process, DDP or compiled), on the CPU
when no GPU is present. A summary with tokens per second goes to stderr.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time

import torch

from models.config import UserError, config_from_dict, run_cli
from models.transformer import GPT
from utils.checkpoint import CONFIG, MODEL, load_checkpoint, load_model_weights
from utils.distributed import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(path: str, device: torch.device, precision: str = "fp32") -> GPT:
    state = load_checkpoint(path)
    model = GPT(config_from_dict(state[CONFIG]).model)
    load_model_weights(model, state[MODEL], path)
    return model.to(device=device, dtype=DTYPES[precision]).eval()


class StopFilter:
    """Streams decoded text, holding back just enough to never print part of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.pending, self.done = stops, "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, text: str) -> str:
        """New text in; the part that is safe to print out. Sets done when a stop string appears."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.done = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate_text(model: GPT, prompt: bytes, args: argparse.Namespace, write=None) -> list[str]:
    """Generate args.num_samples continuations together; stream sample 0 through `write` if given."""
    device = model.tok_emb.weight.device
    idx = torch.tensor([list(prompt)] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed) if args.seed is not None else generator.seed()
    # an incremental decoder holds incomplete multi-byte sequences and replaces invalid bytes
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(args.num_samples)]
    filters = [StopFilter(args.stop or []) for _ in range(args.num_samples)]
    texts = [""] * args.num_samples
    for tokens in model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator):
        for i, token in enumerate(tokens.tolist()):
            if filters[i].done:
                continue
            out = filters[i].push(decoders[i].decode(bytes([token])))
            texts[i] += out
            if write and i == 0 and out:
                write(out)
        if all(f.done for f in filters):
            break
    for i, f in enumerate(filters):
        if not f.done:
            out = f.push(decoders[i].decode(b"", final=True)) + f.flush()
            texts[i] += out
            if write and i == 0 and out:
                write(out)
    return texts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample from a trained byte-level GPT.")
    p.add_argument("--checkpoint", default="checkpoints/best_model.pt")
    p.add_argument("--prompt", default=None, help="text to continue; '-' reads stdin")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1, help="generated together as one batch")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--stop", nargs="+", default=None, help="end a sample at any of these strings")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precision", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.max_new_tokens < 0 or args.num_samples < 1:
        raise UserError("--temperature and --max-new-tokens must be >= 0 and --num-samples >= 1")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if any(s == "" for s in args.stop or []):
        raise UserError("--stop strings must not be empty")
    args.stop = [codecs.decode(s, "unicode_escape") for s in args.stop or []]  # allow "\n\n"
    return args


def read_prompt(args: argparse.Namespace) -> bytes:
    if args.prompt_file is not None:
        try:
            text = open(args.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
    elif args.prompt == "-":
        text = sys.stdin.read()
    else:
        text = args.prompt or ""
    if not text:
        raise UserError("the prompt is empty; give text with --prompt TEXT, --prompt-file FILE or --prompt - (stdin)")
    return text.encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(argv)
        prompt = read_prompt(args)
        device = resolve_device(args.device, 0)
        precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
        model = load_model(args.checkpoint, device, precision)
        out = sys.stdout
        t0 = time.perf_counter()
        stream = (lambda s: (out.write(s), out.flush())) if args.num_samples == 1 else None
        if stream:
            stream(prompt.decode("utf-8", errors="replace"))
        texts = generate_text(model, prompt, args, stream)
        elapsed = time.perf_counter() - t0
        if stream:
            out.write("\n")
        else:
            for i, text in enumerate(texts):
                out.write(f"--- sample {i + 1} ---\n{prompt.decode('utf-8', errors='replace')}{text}\n")
        n = args.num_samples * args.max_new_tokens
        print(f"[{args.num_samples} x up to {args.max_new_tokens} tokens in {elapsed:.2f} s, "
              f"{n / elapsed:,.0f} tokens/s, {device.type} {precision}]", file=sys.stderr)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

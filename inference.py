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
import sys
import time
from pathlib import Path

from utils.checkpoint.format import CONFIG, build_model
from utils.checkpoint.reader import load_weights
from utils.device import DEVICE_CHOICES, resolve_device
from utils.errors import ArgumentParser, UserError, number, require_stdout, run_cli, utf8_text
from utils.generation import TextStream, generate_text
from utils.precision import DTYPES, sampling_precision
from utils.text import to_bytes, unescape


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Sample from a trained byte-level GPT.")
    p.add_argument("--checkpoint", type=utf8_text, default="checkpoints/best_model.pt")
    p.add_argument("--prompt", default=None, help="text to continue; '-' reads stdin")
    p.add_argument("--prompt-file", type=utf8_text, default=None, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=number(int, 0, 10**9, "tokens"), default=500)
    p.add_argument("--temperature", type=number(float, 0, 1e6, "a temperature; 0 = greedy"), default=0.8,
                   help="0 = greedy")
    p.add_argument("--top-k", type=number(int, 1, 2**31 - 1, "tokens"), default=None)
    p.add_argument("--top-p", type=number(float, 0, 1, "a probability", above=True), default=None)
    p.add_argument("--num-samples", type=number(int, 1, 10**6, "samples"), default=1,
                   help="generated together as one batch")
    # a torch.Generator's seed is 64 bits
    p.add_argument("--seed", type=number(int, 0, 2**64 - 1, "64 bits"), default=None,
                   help="same seed, same text (on the same device)")
    p.add_argument("--stop", nargs="+", action="extend", default=[],
                   help="end a sample before any of these strings; backslash escapes like \\n work")
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto: CUDA, then MPS, then CPU)")
    p.add_argument("--precision", choices=["auto", *DTYPES], default="auto",
                   help="default auto: the precision the checkpoint was trained in (fp32 for fp16 on a CPU)")
    args = p.parse_args(argv)
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give the prompt once: --prompt or --prompt-file, not both")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UserError("--temperature 0 is greedy decoding, which --top-k and --top-p do not change; drop them, or "
                        "give a temperature above 0 to sample")
    args.stop = [unescape(s) for s in args.stop]
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
        if sys.stdin is None:
            raise UserError("--prompt - reads standard input, which is closed; pipe the prompt in or use --prompt TEXT")
        prompt = sys.stdin.buffer.read()
    else:  # surrogateescape gives back the exact bytes of an argument that is not valid UTF-8
        prompt = to_bytes(args.prompt or "")
    if not prompt:
        raise UserError("the prompt is empty; give text with --prompt TEXT, --prompt-file FILE or --prompt - (stdin)")
    return prompt


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(argv)
        require_stdout("the samples")
        prompt = read_prompt(args)
        device = resolve_device(args.device, 0)
        state = load_weights(args.checkpoint)
        precision = sampling_precision(args.precision, state[CONFIG]["train"].get("precision"), device)
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

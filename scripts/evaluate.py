"""Loss, perplexity and bits per byte of a checkpoint over a whole data split or any file.

    python -m scripts.evaluate --checkpoint checkpoints/best_model.pt --split val
    python -m scripts.evaluate --checkpoint checkpoints/best_model.pt --split test     # the held-out test split
    python -m scripts.evaluate --checkpoint checkpoints/best_model.pt --text-file notes.txt --json out.json
    torchrun --standalone --nproc_per_node=2 -m scripts.evaluate --checkpoint checkpoints/best_model.pt

Every byte after the first is predicted exactly once, from the context_length bytes of its window
(utils/train/validation.py evaluate, the same function training validates with), so the numbers do not
depend on --batch-size or on the number of processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from data.dataset import load_split
from models.config import DistributedConfig
from utils.checkpoint.format import CONFIG, build_model
from utils.checkpoint.reader import load_weights
from utils.distributed.process_group import process_group
from utils.errors import ArgumentParser, UserError, number, require_stdout, run_cli, utf8_text
from utils.outputs import check_output
from utils.train.validation import evaluate
from utils.device import DEVICE_CHOICES
from utils.precision import DTYPES, autocast_context, sampling_precision


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Evaluate a checkpoint: loss, perplexity, bits per byte.")
    p.add_argument("--checkpoint", type=utf8_text, default="checkpoints/best_model.pt")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--split", choices=["train", "val", "test"], default="val",
                        help="a split of the prepared dataset (test: only if prepared with --test-fraction/--test-bytes)")
    source.add_argument("--text-file", type=utf8_text, default=None, help="any file, read as raw bytes")
    p.add_argument("--data-dir", type=utf8_text, default=None,
                   help="dataset folder for --split (default: the checkpoint's data.dir)")
    p.add_argument("--batch-size", type=number(int, 1, 10**6, "windows"), default=8,
                   help="windows per forward pass (per process)")
    p.add_argument("--max-bytes", type=number(int, 0, 1 << 62, "bytes"), default=0,
                   help="evaluate only this many leading bytes; 0 = all")
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto: CUDA, then MPS, then CPU)")
    p.add_argument("--precision", choices=["auto", *DTYPES], default="auto",
                   help="autocast as in training (default auto: the checkpoint's own, fp32 for fp16 on a CPU)")
    p.add_argument("--json", type=utf8_text, default=None, metavar="OUT",
                   help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.text_file is not None and args.data_dir is not None:
        raise UserError("--data-dir names the dataset of --split, and --text-file replaces it; give one of them")
    return args


def read_data(args: argparse.Namespace, trained_on: str) -> tuple[np.ndarray, str]:
    """The bytes to evaluate and where they come from; trained_on is the checkpoint's data.dir."""
    if args.text_file is not None:
        path = Path(args.text_file)
        if not path.is_file():
            raise UserError(f"--text-file {path} does not exist")
        data = np.fromfile(path, dtype=np.uint8)
        source = str(path)
    else:
        data_dir = args.data_dir or trained_on
        data = load_split(data_dir, args.split)
        source = f"{args.split} split of {data_dir}"
    data = data[: args.max_bytes or None]
    if len(data) < 2:
        raise UserError(f"{source} holds {len(data)} byte(s); evaluation needs at least 2 (one to predict from)")
    return data, source


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(argv)
        require_stdout("the results")
        with process_group(DistributedConfig(), args.device) as info:
            state = load_weights(args.checkpoint)
            if args.json:
                inputs = [args.checkpoint, args.text_file, args.data_dir or state[CONFIG]["data"]["dir"]]
                check_output(args.json, inputs, "--json")
            data, source = read_data(args, state[CONFIG]["data"]["dir"])
            model = build_model(state, args.checkpoint, info.device)
            precision = sampling_precision(args.precision, state[CONFIG]["train"].get("precision"), info.device)
            del state  # frees the optimizer state before evaluation allocates activations
            metrics = evaluate(model, data, model.cfg.context_length, args.batch_size, info,
                               autocast_context(info.device, precision))
        if info.is_main:
            print(f"{args.checkpoint} on {source}: {metrics['bytes']:,} bytes predicted, "
                  f"{info.world_size} process(es), {precision}")
            print(f"loss {metrics['loss']:.6f} nats/byte | perplexity {metrics['perplexity']:.4f} | "
                  f"bits per byte {metrics['bits_per_byte']:.6f}")
            if args.json:
                result = {"checkpoint": str(args.checkpoint), "source": source, "precision": precision,
                          "world_size": info.world_size, **metrics}
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

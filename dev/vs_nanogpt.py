"""Side by side with nanoGPT: its unmodified train.py against our training step, same model, batch
and machine, in one run, alternating, the ratio taken per pair and reported as the median of pairs.

    python -m dev.vs_nanogpt --nanogpt /tmp/nanoGPT --config configs/default_config.yaml \\
        --device cpu train.batch_size=8 --rounds 5

--nanogpt is a checkout of github.com/karpathy/nanoGPT (never part of this repository). Its train.py
runs from there on a copy of our training bytes (as uint16, with a meta.pkl giving vocabulary 256),
with its own options only: the model shape, batch, --device, --compile=False (its CPU path; pass
--compiled to compile both), dtype float32 on a CPU (bfloat16 on a GPU), one eval batch and no
checkpoint. Its step
time is the median of its own `iter N: ... time X ms` lines after the warm-up; ours is
scripts/benchmark.py's median Trainer.train_step. Each pair records the 1-minute load average.
Output: one line per pair, a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from data.dataset import load_split
from dev.runs import run
from models.config import Config
from models.config_checks import ConfigError
from models.config_loader import load_config
from utils.errors import ArgumentParser, UserError, number, run_cli, utf8_text

DATASET = "bytegpt_bench"  # nanoGPT reads data/<dataset>/ relative to its checkout


def nanogpt_flags(cfg: Config, device: str, steps: int, warmup: int, compiled: bool) -> list[str]:
    """nanoGPT's own options for our model and batch; a model nanoGPT cannot express is refused."""
    m, t = cfg.model, cfg.train
    if (m.pos_emb, m.norm, m.activation, m.qk_norm, m.tie_embeddings, m.ffn_dim) != \
            ("learned", "layernorm", "gelu", False, True, 4 * m.dim):
        raise ConfigError("nanoGPT's model is GPT-2's: model.pos_emb=learned, norm=layernorm, activation=gelu, "
                          "qk_norm=false, tie_embeddings=true and ffn_dim=4*dim; compare such a config")
    return [f"--dataset={DATASET}", f"--device={device}", f"--compile={compiled}", f"--dtype={'float32' if device == 'cpu' else 'bfloat16'}",
            f"--n_layer={m.n_layers}", f"--n_head={m.n_heads}", f"--n_embd={m.dim}", f"--block_size={m.context_length}",
            f"--bias={m.bias}", f"--dropout={float(m.dropout)}", f"--batch_size={t.batch_size}",
            f"--gradient_accumulation_steps={t.grad_accum_steps}", f"--max_iters={warmup + steps}",
            f"--lr_decay_iters={warmup + steps}", "--eval_iters=1", f"--eval_interval={10 * (warmup + steps + 1)}",
            "--log_interval=1", "--always_save_checkpoint=False", f"--out_dir=out-{DATASET}"]


def prepare_nanogpt_data(nanogpt: Path, data_dir: Path) -> None:
    """Our prepared bytes as nanoGPT's uint16 token files, with vocab_size 256 in meta.pkl."""
    out = nanogpt / "data" / DATASET
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        with open(out / f"{split}.bin", "wb") as f:
            for shard in load_split(data_dir, split).paths:  # one shard or many, checked against the manifest
                np.fromfile(shard, dtype=np.uint8).astype(np.uint16).tofile(f)
    (out / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 256}))


def run_nanogpt(nanogpt: Path, flags: list[str], warmup: int) -> float:
    """Median ms per iteration of nanoGPT's train.py, after `warmup` iterations (iteration 0 evaluates)."""
    proc = run([sys.executable, "train.py", *flags], cwd=nanogpt, capture_output=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise UserError(f"nanoGPT's train.py exited {proc.returncode} (its output is above)")
    times = [(int(i), float(ms)) for i, ms in re.findall(r"^iter (\d+): loss \S+, time ([\d.]+)ms", proc.stdout, re.M)]
    timed = [ms for i, ms in times if i > warmup]
    if not timed:
        raise UserError("nanoGPT printed no timed iterations; is --nanogpt a nanoGPT checkout?")
    return statistics.median(timed)


def run_ours(args: argparse.Namespace, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "scripts.benchmark", "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--device", args.device, *(["--config", args.config] if args.config else []),
           *overrides, *(["train.compile=true"] if args.compiled else [])]
    proc = run(cmd, cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise UserError(f"scripts/benchmark.py exited {proc.returncode} (its error is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description="Our training step against nanoGPT's train.py, alternating.",
                                epilog="Overrides: section.key=value ... (e.g. train.batch_size=8)")
    p.add_argument("--nanogpt", type=utf8_text, required=True, help="a nanoGPT checkout (e.g. /tmp/nanoGPT)")
    p.add_argument("--config", type=utf8_text, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=number(int, 1, 10**6, "optimizer steps"), default=20,
                   help="timed steps per run (default 20)")
    p.add_argument("--warmup", type=number(int, 1, 10**6, "optimizer steps"), default=3,
                   help="untimed steps first (default 3)")
    p.add_argument("--rounds", type=number(int, 1, 10**4, "pairs"), default=5, help="pairs, alternating (default 5)")
    p.add_argument("--compiled", action="store_true", help="torch.compile both (default: both eager)")

    def body() -> int:
        args, overrides = p.parse_known_args(argv)
        nanogpt = Path(args.nanogpt)
        if not (nanogpt / "train.py").is_file() or not (nanogpt / "configurator.py").is_file():
            raise UserError(f"{nanogpt} is not a nanoGPT checkout (no train.py + configurator.py); "
                            f"get one with: git clone https://github.com/karpathy/nanoGPT {nanogpt}")
        cfg = load_config(args.config, overrides)
        flags = nanogpt_flags(cfg, args.device, args.steps, args.warmup, args.compiled)
        prepare_nanogpt_data(nanogpt, ROOT / cfg.data.dir)
        pairs = []
        for round_ in range(args.rounds):
            load = os.getloadavg()[0]
            theirs_ms = run_nanogpt(nanogpt, flags, args.warmup)
            ours = run_ours(args, overrides)
            pair = {"round": round_ + 1, "nanogpt_ms": round(theirs_ms, 2), "ours_ms": ours["ms_per_step"],
                    "ratio": round(theirs_ms / ours["ms_per_step"], 3), "loadavg_1m_start": round(load, 2),
                    "loadavg_1m_end": round(os.getloadavg()[0], 2)}
            pairs.append(pair)
            print(f"pair {round_ + 1}/{args.rounds}: nanoGPT {pair['nanogpt_ms']} ms/step, ours {pair['ours_ms']} "
                  f"ms/step ({ours['precision']}), {pair['ratio']}x, load {pair['loadavg_1m_start']} -> "
                  f"{pair['loadavg_1m_end']}", flush=True)
        ratio = statistics.median(p["ratio"] for p in pairs)
        tokens = ours["tokens_per_step"]  # the same model and batch on both sides
        summary = {"device": ours["device"], "torch": ours["torch"], "threads": ours["threads"],
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tokens_per_step": tokens,
                   "our_precision": ours["precision"], "compile": args.compiled, "median_ratio": ratio,
                   "nanogpt_tokens_per_sec": round(tokens / statistics.median(p["nanogpt_ms"] for p in pairs) * 1e3, 1),
                   "our_tokens_per_sec": round(tokens / statistics.median(p["ours_ms"] for p in pairs) * 1e3, 1),
                   "pairs": pairs}
        print(f"\n{summary['device']} | torch {summary['torch']} | {summary['threads']} threads | "
              f"{tokens:,} tokens per step | ours: {summary['our_precision']} | {summary['date']}\n")
        print("| pair | nanoGPT ms/step | ours ms/step | ours / nanoGPT tokens/s | load (start -> end) |")
        print("|---:|---:|---:|---:|---|")
        for pr in pairs:
            print(f"| {pr['round']} | {pr['nanogpt_ms']} | {pr['ours_ms']} | {pr['ratio']} | "
                  f"{pr['loadavg_1m_start']} -> {pr['loadavg_1m_end']} |")
        print(f"| **median** | | | **{ratio}x** | |\n")
        print(json.dumps(summary))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

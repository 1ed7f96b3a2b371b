"""Benchmark data preparation and training start-up at scale, on a generated corpus.

    python -m scripts.benchmark_data                       # 4 GB: plain text, JSONL and gzip
    python -m scripts.benchmark_data --size 200M --work /tmp/bench --startup-runs 1

Generates a synthetic English-like corpus of --size bytes (half plain .txt files, a quarter JSONL,
a quarter gzip-compressed text) under --work, then prints one JSON line each for:
  - preparing each kind and the mixed whole with data/prepare_dataset.py, in a fresh process: MB/s
    of input, its peak RSS, next to `cp -r` + `sync` of the same files on the same disk;
  - training start-up on the prepared mixed dataset and on the default corpus: wall time and peak
    RSS of train_single.py running one step of a tiny model (median of --startup-runs);
  - the machine and its load (uptime) at the end.
Everything generated is deleted at the end, also on failure. docs/benchmarks.md holds the results.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from data.prepare_dataset import parse_size
from utils.device import device_name
from utils.errors import ArgumentParser, UserError, number, run_cli, utf8_text

WORDS = ("the of and to in is was that for it with as his on be at by had are but from or have an they which one "
         "you were all her she there would their we him been has when who will no more if out so said what up its "
         "about than into them can only other time new some could these two may first then do any like my now "
         "over such our man me even most made after also did many before must through years where much your way "
         "well down should because each just those people how too little state good very make world still own").split()
BLOCK = 16 << 20  # text is generated as a few random blocks of this size, written in turn


def text_block(rng: np.random.Generator, size: int) -> bytes:
    words = rng.choice(np.array(WORDS), size=size // 4)
    return " ".join(words.tolist()).encode()[:size]


def generate(corpus: Path, size: int, seed: int = 0) -> dict[str, Path]:
    """Half plain text (files of at most 512 MB), a quarter JSONL, a quarter gzip; returns the folders."""
    rng = np.random.default_rng(seed)
    blocks = [text_block(rng, min(BLOCK, size)) for _ in range(4)]  # drawing words is slow; the content does not matter here
    turn = iter(range(1 << 62))

    def block_() -> bytes:
        return blocks[next(turn) % len(blocks)]

    kinds = {k: corpus / k for k in ("plain", "jsonl", "gz")}
    for folder in kinds.values():
        folder.mkdir(parents=True)
    budget = {"plain": size // 2, "jsonl": size // 4, "gz": size - size // 2 - size // 4}
    per_file = 512 << 20
    for i in range((budget["plain"] + per_file - 1) // per_file):
        with open(kinds["plain"] / f"book-{i:03d}.txt", "wb") as f:
            left = min(per_file, budget["plain"] - i * per_file)
            while left > 0:
                block = block_()[:left]
                f.write(block)
                left -= len(block)
    with open(kinds["jsonl"] / "docs.jsonl", "wb") as f:
        written = 0
        while written < budget["jsonl"]:
            text = block_().decode()
            for start in range(0, len(text), 4096):  # 4 KB documents
                line = (json.dumps({"id": written, "text": text[start:start + 4096]}) + "\n").encode()
                f.write(line)
                written += len(line)
                if written >= budget["jsonl"]:
                    break
    with gzip.open(kinds["gz"] / "dump.txt.gz", "wb", compresslevel=1) as f:
        left = budget["gz"]
        while left > 0:
            block = block_()[:left]
            f.write(block)
            left -= len(block)
    return kinds


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# Runs a script and, at exit, writes its VmHWM (peak RSS of its own address space, in kB) to a file.
# getrusage/wait4 are no use here: Linux carries the parent's peak RSS over fork and exec into the child's.
PEAK_RSS = ("import atexit, runpy, sys\n"
            "out, sys.argv = sys.argv[1], sys.argv[2:]\n"
            "atexit.register(lambda: open(out, 'w').write(next(line for line in open('/proc/self/status')\n"
            "                                                  if line.startswith('VmHWM')).split()[1]))\n"
            "if sys.argv[0] == '-m':\n"
            "    sys.argv = sys.argv[1:]\n"
            "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
            "else:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n")


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of `python script args...` in a child process, which must succeed."""
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(peak), *cmd], cwd=ROOT, env=env, text=True,
                              capture_output=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise UserError(f"{' '.join(cmd[:1])} ... exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return seconds, int(peak.read_text()) / 1024, proc.stdout


# What training does with the data before its first step, timed alone (torch import excluded).
DATA_STARTUP = ("import json, sys, time\n"
                "import torch\n"
                "from data.dataset import BatchPlan, load_split\n"
                "from data.shards import verify_dataset\n"
                "start = time.perf_counter()\n"
                "verify_dataset(sys.argv[1])\n"
                "plan = BatchPlan(load_split(sys.argv[1], 'train'), 512, 32, 1, 0, 1, seed=1337)\n"
                "val = load_split(sys.argv[1], 'val')\n"
                "plan.batch(plan.steps_per_epoch - 1, 0, torch.device('cpu'))\n"
                "print(json.dumps({'seconds': time.perf_counter() - start}))\n")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def bench_prepare(name: str, src: Path, work: Path) -> None:
    size = disk_bytes(src)
    copy = work / f"copy-{name}"
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(copy)], check=True)
    subprocess.run(["sync"], check=True)
    cp_seconds = time.perf_counter() - start
    shutil.rmtree(copy)
    out = work / f"data-{name}"
    seconds, rss, _ = timed(["-m", "data.prepare_dataset", "--input", str(src), "--out", str(out),
                             "--progress-every", "60"])
    mb = size / 1e6
    emit({"bench": "prepare", "input": name, "input_mb": round(mb, 1), "output_mb": round(disk_bytes(out) / 1e6, 1),
          "seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 1), "peak_rss_mb": round(rss, 1),
          "cp_sync_seconds": round(cp_seconds, 2), "cp_sync_mb_per_s": round(mb / cp_seconds, 1),
          "vs_cp_sync": round(cp_seconds / seconds, 2)})
    if name != "mixed":
        shutil.rmtree(out)


def bench_startup(name: str, data_dir: Path, work: Path, runs: int) -> None:
    """train_single.py for one step of a tiny model, and the data part of its start-up alone."""
    overrides = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=64", "model.context_length=64",
                 f"data.dir={data_dir}", "train.batch_size=4", "train.max_steps=1", "train.warmup_steps=0",
                 "train.precision=fp32", "train.eval_every=1", "train.eval_max_bytes=4096", "train.sample_tokens=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train, data = [], []
    probe = work / "data_startup.py"
    probe.write_text(DATA_STARTUP)  # run from the root, so the repository imports
    for i in range(runs):
        run = work / f"run-{name}-{i}"
        train.append(timed(["train_single.py", "--device", "cpu", *overrides, f"paths.checkpoint_dir={run}/ckpt",
                            f"paths.log_dir={run}/logs"], env=env)[:2])
        shutil.rmtree(run)
        seconds, rss, out = timed([str(probe), str(data_dir)], env=env)
        data.append((json.loads(out)["seconds"], rss))
    for what, results in (("startup_train_single", train), ("startup_data", data)):
        emit({"bench": what, "dataset": name, "dataset_mb": round(disk_bytes(data_dir) / 1e6, 1), "runs": runs,
              "seconds": round(statistics.median(r[0] for r in results), 3),
              "peak_rss_mb": round(statistics.median(r[1] for r in results), 1)})


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        p = ArgumentParser(description="Benchmark data preparation and training start-up.")
        p.add_argument("--size", default="4G", help="synthetic corpus size (default 4G; K, M, G = 2^10, 2^20, 2^30)")
        p.add_argument("--work", type=utf8_text, default=None,
                       help="scratch folder, deleted afterwards (default: a temporary one)")
        p.add_argument("--startup-runs", type=number(int, 1, 1000, "runs"), default=3,
                       help="start-up runs per dataset (median kept)")
        args = p.parse_args(argv)
        size = parse_size(args.size)
        work = Path(args.work or tempfile.mkdtemp(prefix="bytegpt-bench-data-"))
        if work.exists() and any(work.iterdir()):
            raise UserError(f"--work {work} is not empty; give a new or empty folder (it is deleted afterwards)")
        try:
            start = time.perf_counter()
            kinds = generate(work / "corpus", size)
            emit({"bench": "generate", "size_mb": round(size / 1e6, 1), "seconds": round(time.perf_counter() - start, 1),
                  "on_disk_mb": round(disk_bytes(work / "corpus") / 1e6, 1)})
            for name, folder in kinds.items():
                bench_prepare(name, folder, work)
            bench_prepare("mixed", work / "corpus", work)
            shutil.rmtree(work / "corpus")
            subprocess.run([sys.executable, "-m", "data.prepare_dataset", "--out", str(work / "default")], cwd=ROOT,
                           check=True, capture_output=True)
            bench_startup("generated", work / "data-mixed", work, args.startup_runs)
            bench_startup("default", work / "default", work, args.startup_runs)
            uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            emit({"bench": "machine", "python": platform.python_version(), "cpu": device_name(torch.device("cpu")),
                  "loadavg": os.getloadavg(), "uptime": uptime})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

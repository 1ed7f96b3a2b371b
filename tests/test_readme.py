"""The README, true as written: every command of its code blocks runs, in the order a reader meets them,
in a fresh copy of the repository, and after them the commands of the docs pages it links for the
deeper use (PAGES). Training commands get tiny-model overrides appended (the model, not
the folders: the page's commands must compose as written); inputs the page assumes the reader has (a
folder of books, an enwik8 file) are made small first. What cannot run here says which test runs it."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TINY_TEXT, _started, child_env, finish

README = ROOT / "README.md"
# the pages whose commands a reader runs, in the order they are read: the docs pages continue the README's
# folders (docs/distributed.md fine-tunes on the README's data/books)
PAGES = [README, ROOT / "docs/distributed.md", ROOT / "docs/planning.md"]
TINY = ("model.dim=32 model.n_layers=1 model.n_heads=2 model.ffn_dim=64 model.context_length=32 "
        "train.batch_size=2 train.grad_accum_steps=1 train.max_steps=4 schedule.warmup_steps=1 eval.every=2 "
        "eval.max_bytes=4096 eval.sample_tokens=8 checkpoint.every=2 train.compile=false")
# a command that cannot run on this machine -> why, and the test that runs what it can of it
ELSEWHERE = {
    "bash scripts/quickstart.sh": ".ci/run runs it first, on a fresh clone",
    "python -m pip install": ".ci/run installs requirements-dev.txt on a fresh clone",
    "pip install -r requirements.txt": ".ci/run (through scripts/quickstart.sh) installs it on a fresh clone",
    "python -m pytest -q": ".ci/run runs the whole suite; this test is part of it",
    "--rdzv_endpoint=node0": "needs two machines: tests/test_multinode.py runs two torchrun agents as two nodes",
    "sbatch": "needs SLURM (and GPUs): tests/test_slurm.py runs the CPU line on a local SLURM cluster",
    "mkdir -p logs": "the SLURM block's first line, run with it by tests/test_slurm.py",
    "bash scripts/gpu_check.sh": "tests/test_gpu_check.py runs it (here, without a GPU: the table of skips)",
    "bash dev/gpu_track.sh": "a 12-layer model for 3 minutes: tests/test_record.py runs it with a tiny config",
}
SERVERS = {"tensorboard --logdir": "TensorBoard"}  # runs until stopped: started, awaited, stopped


def commands() -> list[str]:
    """Every command of the pages' bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", "\n".join(page.read_text() for page in PAGES), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = without_comment(line).strip()
            if line:
                out.append(line)
    return out


def without_comment(line: str) -> str:
    """The line up to its first `#` that starts a word outside quotes (bash's rule for comments)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def make_inputs(repo: Path) -> None:
    """What the page assumes the reader has, small."""
    text = TINY_TEXT.encode()
    (repo / "books").mkdir()
    (repo / "books/a.txt").write_bytes(text)
    (repo / "more_books").mkdir()
    (repo / "more_books/b.txt").write_bytes(text[::-1])
    (repo / "dumps").mkdir()
    (repo / "dumps/a.gz").write_bytes(gzip.compress(text))
    (repo / "dumps/b.xz").write_bytes(lzma.compress(text))
    (repo / "dumps/c.bz2").write_bytes(bz2.compress(text))
    lines = "".join(json.dumps({"text": line}) + "\n" for line in TINY_TEXT.splitlines())
    (repo / "docs.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": TINY_TEXT.splitlines()}), repo / "export.parquet")
    (repo / "enwik8").write_bytes((text * (10_400_000 // len(text) + 1))[:10_400_000])  # > 5M val + 5M test
    (repo / "some.txt").write_bytes(text[:3000])
    (repo / "prompt.txt").write_text("ROMEO:\n")
    shared = repo.parent / "shared/data"
    shared.mkdir(parents=True)
    (shared / "tinyshakespeare.txt").write_bytes(text * 3)
    # a nanoGPT train.py log, as scripts/plot_runs.py reads it
    (repo / "nanogpt.log").write_text("".join(f"step {s}: train loss {3 - s / 100:.4f}, val loss {3.1 - s / 100:.4f}\n"
                                              f"iter {s}: loss {3 - s / 100:.4f}, time 10.00ms, mfu 1.00%\n"
                                              for s in (0, 10, 20)))


def adapt(cmd: str, repo: Path) -> str:
    """The command as written, plus tiny-model overrides where it trains, and the page's placeholders
    (RUN: a run's TensorBoard folder) filled in."""
    if "RUN" in cmd:
        run = next((repo / "logs/tensorboard").iterdir()).name
        cmd = cmd.replace("logs/tensorboard/RUN", f"logs/tensorboard/{run}")
    if re.search(r"\btrain_(single|ddp)\.py\b", cmd):
        cmd += " " + TINY
    if "scripts.evaluate" in cmd:
        cmd += " --max-bytes 65536"  # the enwik8 test split is 5 MB
    if "scripts.benchmark" in cmd:
        cmd += f" --steps 1 --warmup 0 {TINY}"
    if "dev.ablate" in cmd:
        cmd = cmd.replace("--budget 25", "--budget 0.2").replace("--seeds 1 2", "--seeds 1")
        cmd = re.sub(r'--variant "(\w+):([^"]*)"', rf'--variant "\1:\2 {TINY}"', cmd)
        cmd = cmd.replace("--variant base", f'--variant "base:{TINY}"')
    return cmd


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    """Each command of the README and its command pages, in order, exits 0 in a fresh copy of the repository."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    make_inputs(repo)
    env = child_env(BYTEGPT_PROGRESS_INTERVAL="60")
    ran, elsewhere = [], []
    for cmd in commands():
        if reason := next((why for key, why in ELSEWHERE.items() if key in cmd), None):
            elsewhere.append(f"{cmd}: {reason}")
            continue
        line = adapt(cmd, repo)
        server = next((name for key, name in SERVERS.items() if cmd.startswith(key)), None)
        proc = subprocess.Popen(["bash", "-c", f"exec {line}" if server else line], cwd=repo, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        _started.append(proc)  # killed with everything under it if the test fails or hangs
        if server:
            out = ""
            for out_line in proc.stdout:
                out += out_line
                if "http://" in out_line:
                    break
            assert "http://" in out, f"{cmd}\n{out}"
            proc.kill()
            proc.wait()
        else:
            done = finish(proc, 600)
            assert done.returncode == 0, f"command of README.md or docs/ failed: {line}\n{done.stdout[-3000:]}"
        ran.append(cmd)
    assert len(ran) >= 25 and all(elsewhere), elsewhere

"""Data preparation inputs: every kind round-trips to the exact bytes, the README's commands run,
progress is a bar on a terminal and log lines otherwise, and every bad input is one line."""

import bz2
import fcntl
import gzip
import json
import lzma
import os
import pty
import re
import shlex
import subprocess
import struct
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, child_env, run_script
from data.dataset import load_split

DOCS = ["first document\nwith two lines", "zweites Dokument: äöü ✓", "", "the third, last one " * 3]
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def dataset_bytes(data_dir: Path) -> bytes:
    """train, then val, then test: the whole prepared stream."""
    parts = []
    for split in ("train", "val", "test"):
        try:
            data = load_split(data_dir, split)
        except Exception:
            continue
        parts.append(data[np.arange(len(data))].tobytes())
    return b"".join(parts)


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> None:
    lines = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()
    path.write_bytes(COMPRESS[path.suffix](lines) if path.suffix in COMPRESS else lines)


def write_parquet(path: Path, docs: list, field: str = "text", binary: bool = False) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    kind = pa.binary() if binary else pa.string()
    pq.write_table(pa.table({"id": list(range(len(docs))), field: pa.array(docs, type=kind)}), path, row_group_size=2)


def make_input(tmp: Path, kind: str) -> Path:
    """DOCS as one input of this kind: a folder of (compressed) files, a JSONL file or a Parquet file."""
    if kind.startswith("text"):
        suffix = kind[4:]
        (tmp / "src").mkdir()
        for i, doc in enumerate(DOCS):
            raw = doc.encode()
            (tmp / "src" / f"{i}.txt{suffix}").write_bytes(COMPRESS[suffix](raw) if suffix else raw)
        return tmp / "src"
    if kind.startswith("jsonl"):
        write_jsonl(tmp / f"docs.{kind}", DOCS)
        return tmp / f"docs.{kind}"
    write_parquet(tmp / "docs.parquet", DOCS)
    return tmp / "docs.parquet"


@pytest.mark.parametrize("kind", ["text", "text.gz", "text.bz2", "text.xz", "jsonl", "jsonl.gz", "parquet"])
def test_every_input_kind_round_trips(tmp_path, kind):
    """Each kind gives exactly its documents joined by the chosen separator, split 70/20/10."""
    src = make_input(tmp_path, kind)
    run_script("-m", "data.prepare_dataset", "--input", src, "--out", tmp_path / "d", "--separator", "\\n<doc>\\n",
               "--val-fraction", "0.2", "--test-fraction", "0.1", "--shard-size", "16", check=True)
    expected = "\n<doc>\n".join(DOCS).encode()
    assert dataset_bytes(tmp_path / "d") == expected
    manifest = json.loads((tmp_path / "d/manifest.json").read_text())
    n = len(expected)
    assert (manifest["val_bytes"], manifest["test_bytes"]) == (int(n * 0.2), int(n * 0.1))
    assert manifest["parts"][0]["reader"] == {"separator": "\n<doc>\n", "text_field": "text"}


def test_readme_large_corpus_commands(tmp_path):
    """The README's "Large corpora" commands, run as written on small files of each kind."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Large corpora"):]
    block = section[section.index("```bash") + 7: section.index("```", section.index("```bash") + 7)]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if "data.prepare_dataset" in line]
    assert len(commands) == 6, commands
    (tmp_path / "books").mkdir()
    (tmp_path / "more_books").mkdir()
    (tmp_path / "dumps").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "books" / f"{i}.txt").write_text(doc * 4)
        (tmp_path / "more_books" / f"{i}.md").write_text(doc[::-1] * 4)
    (tmp_path / "dumps/a.txt.gz").write_bytes(gzip.compress(b"gzip text " * 20))
    (tmp_path / "dumps/b.xz").write_bytes(lzma.compress(b"xz text " * 20))
    write_jsonl(tmp_path / "docs.jsonl.gz", DOCS)
    write_parquet(tmp_path / "export.parquet", DOCS, field="content")
    enwik8 = np.random.default_rng(0).integers(0, 256, 12_000_000, dtype=np.uint8).tobytes()
    (tmp_path / "enwik8").write_bytes(enwik8)
    for command in commands:
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "data.prepare_dataset"]
        subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, check=True, capture_output=True,
                       env=child_env(), timeout=300)
    books = "\n".join(d * 4 for d in DOCS).encode()
    with_more = load_split(tmp_path / "data/books", "train")
    assert len(with_more) > int(len(books) * 0.9)  # both parts' train shards, each split 90/10
    assert dataset_bytes(tmp_path / "data/docs") == "\n\n".join(DOCS).encode()
    assert dataset_bytes(tmp_path / "data/export") == "\n".join(DOCS).encode()
    assert dataset_bytes(tmp_path / "data/dumps") == b"gzip text " * 20 + b"\n" + b"xz text " * 20
    splits = {s: load_split(tmp_path / "data/enwik8", s) for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [2_000_000, 5_000_000, 5_000_000]
    assert splits["test"][np.arange(5_000_000)].tobytes() == enwik8[-5_000_000:]
    assert splits["val"][np.arange(5_000_000)].tobytes() == enwik8[2_000_000:7_000_000]


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(tmp_path):
    """On a terminal: a tqdm bar with bytes/s and no log lines; in a pipe: log lines with rate and ETA, no bar."""
    (tmp_path / "in.txt").write_bytes(b"some text " * 300_000)
    args = [sys.executable, "-m", "data.prepare_dataset", "--input", tmp_path / "in.txt", "--progress-every", "0"]
    piped = run_script(*args[1:], "--out", tmp_path / "a", check=True)
    assert re.search(r"preparing .*: 3 of 3 MB \(100%\), [\d.,]+ MB/s, \d+ s elapsed, ETA 0 s", piped.stderr), \
        piped.stderr
    assert "\r" not in piped.stderr and "it/s" not in piped.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a real terminal has a size
    proc = subprocess.Popen([*map(str, args), "--out", str(tmp_path / "b")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=follower, env=child_env())
    os.close(follower)
    shown = b""
    try:
        while chunk := os.read(leader, 4096):
            shown += chunk
    except OSError:  # EIO: every writer of the terminal has exited
        pass
    finally:
        os.close(leader)
    assert proc.wait(timeout=120) == 0
    assert b"B/s" in shown and b"100%" in shown and b"ETA" not in shown, shown


BAD_INPUTS = {
    "jsonl invalid utf-8": ("in.jsonl", b'{"text": "fine"}\n{"text": "\xff\xfe"}\n', "in.jsonl:2: invalid UTF-8"),
    "jsonl missing field": ("in.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', "in.jsonl:3: no field 'text'"),
    "jsonl not json": ("in.jsonl", b'{"text": "a"}\n{"text": "trunc', "in.jsonl:2: not valid JSON"),
    "jsonl not a string": ("in.jsonl", b'{"text": 5}\n', "in.jsonl:1: field 'text' is a number, not a string"),
    "jsonl lone surrogate": ("in.jsonl", b'{"text": "\\ud800"}\n', "in.jsonl:1: field 'text' is not valid UTF-8"),
    "truncated gz": ("in.txt.gz", gzip.compress(b"abc" * 1000)[:-12], "in.txt.gz: compressed data is truncated"),
    "truncated bz2": ("in.txt.bz2", bz2.compress(b"abc" * 1000)[:-12], "in.txt.bz2: compressed data is truncated"),
    "truncated xz": ("in.txt.xz", lzma.compress(b"abc" * 1000)[:-12], "in.txt.xz: compressed data is truncated"),
    "truncated jsonl.gz": ("in.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 200)[:-12],
                           "in.jsonl.gz:167: compressed data is truncated"),
    "not gzip": ("in.txt.gz", b"plain text, not gzip", "in.txt.gz: compressed data is truncated or corrupt"),
    "not parquet": ("in.parquet", b"plain text, not parquet", "in.parquet: not a readable Parquet file"),
    "empty": ("in.txt", b"  \n", "the input is empty"),
}


def parquet_case(tmp: Path, case: str) -> tuple[Path, str]:
    if case == "parquet invalid utf-8":
        write_parquet(tmp / "in.parquet", [b"ok", b"\xff bad"], binary=True)
        return tmp / "in.parquet", "in.parquet: row 2: 'text' is not valid UTF-8"
    if case == "parquet null":
        write_parquet(tmp / "in.parquet", ["a", "b", None])
        return tmp / "in.parquet", "in.parquet: row 3: 'text' is null"
    write_parquet(tmp / "in.parquet", ["a", "b"], field="body")
    return tmp / "in.parquet", "in.parquet: no column 'text' (columns: id, body)"


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", [*BAD_INPUTS, "parquet invalid utf-8", "parquet null", "parquet missing column",
                                  "missing file"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, case):
    """Each bad input: one `error:` line naming the file (and line or row), exit 2, no output folder."""
    if case in BAD_INPUTS:
        name, content, fragment = BAD_INPUTS[case]
        (tmp_path / name).write_bytes(content)
        src = tmp_path / name
    elif case == "missing file":
        src, fragment = tmp_path / "nope.txt", "nope.txt' does not exist"
    else:
        src, fragment = parquet_case(tmp_path, case)
    proc = run_script("-m", "data.prepare_dataset", "--input", src, "--out", tmp_path / "d")
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "d").exists()


def test_parquet_without_pyarrow_names_the_package(tmp_path):
    """Without pyarrow a Parquet input is refused up front, in one line that says what to install."""
    (tmp_path / "in.parquet").write_bytes(b"PAR1")  # refused before it is opened, so any content does
    code = ("import sys; sys.modules['pyarrow'] = sys.modules['pyarrow.parquet'] = None; "  # import now fails
            "from data.prepare_dataset import main; sys.exit(main())")
    proc = run_script("-c", code, "--input", tmp_path / "in.parquet", "--out", tmp_path / "d")
    assert_one_line_error(proc, "needs pyarrow, which is not installed: pip install pyarrow")
    assert not (tmp_path / "d").exists()


def test_parquet_is_read_in_memory_that_does_not_grow_with_the_file(tmp_path):
    """Arrow's memory stays about one batch of rows, not the file: pre-buffering row groups grew it with the
    file (peak RSS 735 MB on a 506 MB export); here it would hold the whole 27 MB file."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from data.sources import joined_stream

    doc = os.urandom(500).hex()  # 1 KB documents that do not compress, so the file is as large as its text
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [doc + str(i) for i in range(27_000)]}), path, row_group_size=1000,
                   compression="none")
    peak = 0
    for _ in joined_stream([path], b"\n", "text", lambda n: None):
        peak = max(peak, pa.total_allocated_bytes())
    assert 0 < peak < path.stat().st_size / 3, f"Arrow held {peak / 2**20:.1f} MB"


def test_failure_after_shards_were_staged_leaves_the_dataset_as_it_was(tmp_path):
    """An --append that fails after writing 9 MB of shards leaves the old files byte-identical and no
    temporaries; the same for a failing first preparation, which leaves no folder."""
    (tmp_path / "a.txt").write_bytes(b"first corpus " * 100)
    run_script("-m", "data.prepare_dataset", "--input", tmp_path / "a.txt", "--out", tmp_path / "d", check=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    (tmp_path / "big.txt").write_bytes(b"x" * 9_000_000)  # larger than one chunk: staged before the error
    (tmp_path / "z.txt.gz").write_bytes(gzip.compress(b"abc" * 1000)[:-12])
    for out, extra in ((tmp_path / "d", ["--append"]), (tmp_path / "new", [])):
        proc = run_script("-m", "data.prepare_dataset", "--input", tmp_path / "big.txt", tmp_path / "z.txt.gz",
                          "--out", out, "--shard-size", "1M", *extra)
        assert_one_line_error(proc, "z.txt.gz: compressed data is truncated")
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    assert not (tmp_path / "new").exists()

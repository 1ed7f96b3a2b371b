"""Turn text into byte-level train/val(/test) shards that training memory-maps, in constant memory.

    python -m data.prepare_dataset                          # default corpus -> data/default
    python -m data.prepare_dataset --input notes/ "*.md" --out data/mine --val-fraction 0.05
    python -m data.prepare_dataset --input dump.jsonl.gz --text-field text --out data/mine --append
    python -m data.prepare_dataset --input enwik8 --val-bytes 5000000 --test-bytes 5000000 --out data/enwik8

Writes <out>/train-00000.bin, ..., val-00000.bin, ... (raw bytes as uint8, vocabulary 256; see
data/shards.py) and <out>/manifest.json. The input is streamed once, in chunks, whatever its size.
Documents are joined by --separator; of the joined bytes the first part is train, then val, then
test. Re-running with the same input and settings leaves the files untouched; --append adds new
input (split the same way) as new shards and never rewrites the old ones.

The default corpus is the English reference text that ships inside every CPython install
(pydoc_data.topics: the language reference behind `help()`), so it builds offline.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import re
import sys
from pathlib import Path
from typing import Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from data.shards import (MANIFEST, MANIFEST_VERSION, SPLITS, DataError, ShardWriter, Stage, check_shards, commit,
                         read_manifest, remove_dead_temporaries, split_off_tail)
from data.sources import check_inputs, expand_inputs, joined_stream
from utils.errors import ArgumentParser, number, run_cli, utf8_text
from utils.folder_lock import FolderLock
from utils.outputs import check_output
from utils.progress import progress
from utils.text import to_bytes, unescape

DEFAULT_SHARD_SIZE = 1 << 30
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def default_corpus() -> tuple[bytes, list[str]]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[name] for name in sorted(topics.topics))
    return text.encode("utf-8"), [f"python{sys.version_info.major}.{sys.version_info.minor}:pydoc_data.topics"]


def split_sizes(n: int, spec: dict) -> tuple[int, int, int]:
    """(train, val, test) byte counts of n bytes: explicit counts where given, else fractions."""
    held = [spec[f"{s}_bytes"] if spec.get(f"{s}_bytes") is not None else int(n * spec.get(f"{s}_fraction", 0.0))
            for s in ("val", "test")]
    sizes = (n - sum(held), *held)
    wanted = ("train", "val") + (("test",) if held[1] or spec.get("test_fraction") else ())
    if any(sizes[SPLITS.index(s)] < 2 for s in wanted):
        raise DataError(f"{n:,} bytes cannot give train/val/test splits of {sizes[0]:,}/{sizes[1]:,}/{sizes[2]:,} "
                        f"bytes (each needs at least 2); give more text or hold out less")
    return sizes


def _identity(part: dict, with_sources: bool) -> dict:
    """What makes two runs the same: content, settings and, for a full prepare, the sources."""
    keys = ("input_bytes", "input_digest", "split", "shard_size", "reader") + (("sources",) if with_sources else ())
    return {k: part.get(k) for k in keys}


def _already_done(out: Path, old: dict, part: dict, append: bool) -> bool:
    """Whether the dataset already holds this input (appended or prepared alone), complete."""
    same = any(_identity(p, False) == _identity(part, False) for p in old["parts"]) if append \
        else [_identity(p, True) for p in old["parts"]] == [_identity(part, True)]
    try:
        check_shards(out, old, SPLITS, sha256=False)
    except DataError:
        return False
    return same


def prepare(out: str | Path, chunks: Iterable[bytes], sources: list[str], val_fraction: float = 0.1,
            test_fraction: float = 0.0, *, val_bytes: int | None = None, test_bytes: int | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE, append: bool = False,
            reader: dict | None = None) -> tuple[dict, bool]:
    """Stream chunks into shards and write the manifest; returns (manifest, whether anything changed).

    The folder is claimed first (another preparation into it at once is refused); on any error every file
    this run staged is removed (and `out` too if this run created it).
    """
    out = Path(out)
    lock, stage = FolderLock(out, "a dataset preparation"), Stage(out)
    try:
        lock.acquire()
        remove_dead_temporaries(out)
        old = None
        if (out / MANIFEST).is_file():
            try:
                old = read_manifest(out)
            except DataError:
                if append:
                    raise
        base = old if append else None
        next_index = {s: len(base["splits"][s]) if base else 0 for s in SPLITS}
        staging = ShardWriter(stage, "train", next_index["train"], shard_size)
        n, has_text = 0, False
        for chunk in chunks:
            staging.write(chunk)
            n += len(chunk)
            has_text = has_text or (len(chunk) > 0 and not chunk.isspace())
        staged = staging.close()
        if not has_text:
            raise DataError("the input is empty: give --input files that contain text")
        spec = {"val_fraction": val_fraction, "test_fraction": test_fraction, "val_bytes": val_bytes,
                "test_bytes": test_bytes}
        n_train, n_val, n_test = split_sizes(n, spec)
        # the staged shards' hashes identify the input without hashing every byte twice
        digest = hashlib.sha256("".join(e["sha256"] for e in staged).encode()).hexdigest()
        part = {"sources": sources, "input_bytes": n, "input_digest": digest, "split": spec,
                "shard_size": shard_size, "reader": reader or {}}
        if old is not None and _already_done(out, old, part, append):
            return old, False
        writers = {s: ShardWriter(stage, s, next_index[s], shard_size) for s in ("val", "test")}
        new = {"train": split_off_tail(stage, staged, n_train, [(writers["val"], n_val), (writers["test"], n_test)]),
               "val": writers["val"].close(), "test": writers["test"].close()}
        part.update(train_bytes=n_train, val_bytes=n_val, test_bytes=n_test)
        parts = (base["parts"] if base else []) + [part]
        splits = {s: (base["splits"][s] if base else []) + new[s] for s in SPLITS}
        manifest = {"version": MANIFEST_VERSION, **{f"{s}_bytes": sum(e["bytes"] for e in splits[s]) for s in SPLITS},
                    "sources": [src for p in parts for src in p["sources"]], "splits": splits, "parts": parts}
        commit(stage, manifest, [e for s in SPLITS for e in new[s]], replaced=None if append else old)
        return manifest, True
    except OSError as e:
        raise DataError(f"cannot write to {out}: {e.strerror or e}") from None
    finally:
        if out.is_dir():
            stage.remove()
        lock.release()


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d{1,18})\s*([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not match or int(match[1]) == 0:
        raise DataError(f"--shard-size must be a positive size such as 1G, 256M or 4096 (got '{text}')")
    return int(match[1]) * UNITS[match[2].upper()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Prepare a byte-level dataset for training.")
    p.add_argument("--input", type=utf8_text, nargs="+", default=None,
                   help="files, folders or globs; .gz/.bz2/.xz, .jsonl, .parquet (default: the text shipped with CPython)")
    p.add_argument("--out", type=utf8_text, default="data/default", help="output folder (default: data/default)")
    val, test = p.add_mutually_exclusive_group(), p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=number(float, 0, 1, "a fraction of the input", above=True), default=0.1,
                     help="fraction held out for validation (default 0.1)")
    val.add_argument("--val-bytes", type=number(int, 2, 1 << 62, "bytes"), default=None,
                     help="exact validation size in bytes")
    test.add_argument("--test-fraction", type=number(float, 0, 1, "a fraction of the input"), default=0.0,
                      help="fraction held out for testing (default 0)")
    test.add_argument("--test-bytes", type=number(int, 2, 1 << 62, "bytes"), default=None,
                      help="exact test size in bytes")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text (default: text)")
    p.add_argument("--separator", default="\\n", help="between documents (default '\\n'; '\\n\\n', '' ...)")
    p.add_argument("--shard-size", default="1G", help="largest shard file (default 1G; K, M, G = 2^10, 2^20, 2^30)")
    p.add_argument("--append", action="store_true", help="add this input as new shards; old shards stay as they are")
    p.add_argument("--progress-every", type=number(float, 0, 86400, "seconds"), default=5.0,
                   help="seconds between progress lines when not on a terminal (default 5)")
    args = p.parse_args(argv)
    if args.val_fraction + args.test_fraction >= 1.0:
        raise DataError(f"--val-fraction and --test-fraction must together be below 1, to leave training text "
                        f"(got {args.val_fraction} and {args.test_fraction})")
    return args


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(argv)
        out, shard_size, separator = Path(args.out), parse_size(args.shard_size), to_bytes(unescape(args.separator))
        bar = None
        if args.input:
            files = expand_inputs(args.input)
            check_output(out, [*files, *(item for item in args.input if not glob.has_magic(item))])
            check_inputs(files)
            bar = progress(sum(f.stat().st_size for f in files), f"preparing {out.name}", unit="B",
                           interval=args.progress_every)
            chunks, sources = joined_stream(files, separator, args.text_field, bar.update), [str(f) for f in files]
        else:
            data, sources = default_corpus()
            chunks = [data]
        try:
            manifest, wrote = prepare(out, chunks, sources, args.val_fraction, args.test_fraction,
                                      val_bytes=args.val_bytes, test_bytes=args.test_bytes, shard_size=shard_size,
                                      append=args.append, reader={"separator": separator.decode("utf-8", "surrogateescape"),
                                                                  "text_field": args.text_field})
        finally:
            if bar is not None:
                bar.close()
        state = ("appended to" if args.append else "wrote") if wrote else "already up to date:"
        shards = sum(len(v) for v in manifest["splits"].values())
        print(f"{state} {out}: {manifest['train_bytes']:,} train, {manifest['val_bytes']:,} val, "
              f"{manifest['test_bytes']:,} test bytes in {shards} shard(s) from {len(manifest['sources'])} source(s)")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

"""Turn text into byte-level train/val splits that training memory-maps.

    python data/prepare_dataset.py                          # default corpus -> data/default
    python data/prepare_dataset.py --input notes/ "*.md" --out data/mine --val-fraction 0.05

Writes <out>/train.bin and <out>/val.bin (raw UTF-8 bytes as uint8, vocabulary 256) and
<out>/manifest.json (sources, byte counts, sha256). The last val_fraction of the bytes is the
validation split. Re-running with the same input and settings leaves the files untouched.

The default corpus is the English reference text that ships inside every CPython install
(pydoc_data.topics: the language reference behind `help()`), so it builds offline.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from pathlib import Path

MANIFEST_VERSION = 1


class DataError(Exception):
    """The input cannot be turned into a dataset."""


def default_corpus() -> tuple[bytes, list[str]]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[name] for name in sorted(topics.topics))
    return text.encode("utf-8"), [f"python{sys.version_info.major}.{sys.version_info.minor}:pydoc_data.topics"]


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (every file below, sorted) and globs, in the order given."""
    files: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            raise DataError(f"--input '{item}' matches no file")
        for match in map(Path, matches):
            if match.is_dir():
                files.extend(sorted(p for p in match.rglob("*") if p.is_file()))
            elif match.is_file():
                files.append(match)
            else:
                raise DataError(f"--input '{match}' does not exist")
    return files


def read_inputs(files: list[Path]) -> bytes:
    parts = []
    for f in files:
        try:
            parts.append(f.read_bytes())
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror}") from None
    return b"\n".join(parts)


def split(data: bytes, val_fraction: float) -> tuple[bytes, bytes]:
    n_val = int(len(data) * val_fraction)
    return data[: len(data) - n_val], data[len(data) - n_val:]


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(out: Path, data: bytes, sources: list[str], val_fraction: float) -> tuple[dict, bool]:
    """Write the splits and manifest; returns (manifest, whether anything was written)."""
    if not data.strip():
        raise DataError("the input is empty: give --input files that contain text")
    train, val = split(data, val_fraction)
    if len(val) < 2 or len(train) < 2:
        raise DataError(f"{len(data)} bytes is too little for a train/val split of {val_fraction}; "
                        f"give more text or change --val-fraction")
    manifest = {
        "version": MANIFEST_VERSION,
        "sources": sources,
        "val_fraction": val_fraction,
        "total_bytes": len(data),
        "train_bytes": len(train),
        "val_bytes": len(val),
        "sha256": {"input": hashlib.sha256(data).hexdigest(), "train.bin": hashlib.sha256(train).hexdigest(),
                   "val.bin": hashlib.sha256(val).hexdigest()},
    }
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and all((out / n).is_file() for n in ("train.bin", "val.bin")):
        try:
            if json.loads(manifest_path.read_text()) == manifest:
                return manifest, False
        except json.JSONDecodeError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "train.bin", train)
    _write_atomic(out / "val.bin", val)
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare a byte-level dataset for training.")
    parser.add_argument("--input", nargs="+", default=None,
                        help="files, folders or globs (default: the text shipped with CPython)")
    parser.add_argument("--out", default="data/default", help="output folder (default: data/default)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="last fraction held out (default 0.1)")
    args = parser.parse_args(argv)
    try:
        if not 0.0 < args.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be between 0 and 1 (got {args.val_fraction})")
        if args.input:
            files = expand_inputs(args.input)
            data, sources = read_inputs(files), [str(f) for f in files]
        else:
            data, sources = default_corpus()
        manifest, wrote = prepare(Path(args.out), data, sources, args.val_fraction)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write to {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    state = "wrote" if wrote else "already up to date:"
    print(f"{state} {args.out}: {manifest['train_bytes']:,} train bytes, {manifest['val_bytes']:,} val bytes "
          f"from {len(manifest['sources'])} source(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

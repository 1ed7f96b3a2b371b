"""The prepared dataset on disk: shard files, the manifest that lists them, and checks against it.

<dir>/manifest.json lists, for each split (train, val, test), shard files <split>-NNNNN.bin (raw
bytes as uint8, at most shard_size each) with their sizes and sha256, and every part (one per
prepare or --append run) with its sources and settings. Shards are written under hidden
temporary names unique to their writer (`Stage`), hashed as they are written, and renamed into place
only once the whole run has succeeded and every one is checked; the manifest is replaced last. The
writer holds the folder (utils/folder_lock.py) from before it reads the old manifest to the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable

from utils.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
SPLITS = ("train", "val", "test")
CHUNK = 8 << 20  # bytes per read or write: large enough for disk speed, small enough for flat memory


class DataError(UserError):
    """The input cannot be turned into a dataset, or a dataset does not match its manifest."""


class Stage:
    """One writer's temporaries in a dataset folder: named .NAME.TAG.tmp with a tag of its own, removed only by it."""

    def __init__(self, out: Path) -> None:
        self.out, self.tag = out, secrets.token_hex(6)

    def path(self, name: str) -> Path:
        return self.out / f".{name}.{self.tag}.tmp"

    def remove(self) -> None:
        for path in self.out.glob(f".*.{self.tag}.tmp"):
            path.unlink(missing_ok=True)


def remove_dead_temporaries(out: Path) -> None:
    """Temporaries of writers killed mid-run; only for the holder of the folder's claim, which rules out a live one."""
    for path in out.glob(".*.tmp"):
        path.unlink(missing_ok=True)


class ShardWriter:
    """One split's bytes -> staged shards of at most shard_size bytes, each hashed as it is written."""

    def __init__(self, stage: Stage, split: str, first_index: int, shard_size: int) -> None:
        self.stage, self.split, self.index, self.shard_size = stage, split, first_index, shard_size
        self.shards: list[dict] = []  # {"file", "bytes", "sha256"} of every closed shard
        self._file: BinaryIO | None = None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._file is None:
                self._name = f"{self.split}-{self.index:05d}.bin"
                self._file, self._hash, self._size = open(self.stage.path(self._name), "wb"), hashlib.sha256(), 0
                self.index += 1
            piece = view[: self.shard_size - self._size]
            self._file.write(piece)
            self._hash.update(piece)
            self._size += len(piece)
            view = view[len(piece):]
            if self._size == self.shard_size:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards.append({"file": self._name, "bytes": self._size, "sha256": self._hash.hexdigest()})

    def close(self) -> list[dict]:
        if self._file is not None:
            self._close_shard()
        return self.shards


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Sequence:
    """Writes a stream into several writers in turn, each for its fixed number of bytes."""

    def __init__(self, sinks: Iterable[tuple[ShardWriter, int]]) -> None:
        self.targets, self.writer, self.left = iter(sinks), None, 0

    def write(self, data: memoryview) -> None:
        while data:
            while self.left == 0:
                self.writer, self.left = next(self.targets)
            piece = data[: self.left]
            self.writer.write(piece)
            self.left -= len(piece)
            data = data[len(piece):]


def split_off_tail(stage: Stage, staged: list[dict], keep: int, sinks: list[tuple[ShardWriter, int]]) -> list[dict]:
    """Keep the first `keep` bytes of the staged shards and stream the rest, in order, into the sinks
    (writer, byte count). Besides the tail, only the shard holding the cut is read again (re-hashed)."""
    kept, start, tail = [], 0, _Sequence(sinks)
    for entry in staged:
        path, end = stage.path(entry["file"]), start + entry["bytes"]
        if end <= keep:
            kept.append(entry)
        else:
            cut = max(keep - start, 0)
            with open(path, "rb") as f:
                f.seek(cut)
                while chunk := f.read(CHUNK):
                    tail.write(memoryview(chunk))
            if cut == 0:
                path.unlink()
            else:
                os.truncate(path, cut)
                kept.append({"file": entry["file"], "bytes": cut, "sha256": file_sha256(path)})
        start = end
    return kept


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"dataset not prepared: {path} is missing; run `python -m data.prepare_dataset --out "
                        f"{data_dir}` (add --input FILES for your own text)")
    prepare_again = (f"prepare the dataset again with `python -m data.prepare_dataset --out {data_dir}` and the "
                     f"same --input (it replaces the manifest)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested absurdly, an integer of 5000 digits
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        found = manifest.get("version") if isinstance(manifest, dict) else "unreadable"
        raise DataError(f"{path} is not a format-{MANIFEST_VERSION} manifest (found: {found!r:.40}); {prepare_again}")
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} was not written by data.prepare_dataset or was edited: {problem}; {prepare_again}")
    return manifest


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_problem(manifest: dict) -> str | None:
    """What makes a parsed manifest unusable (a split missing, a size that is not a count, a shard named
    by a path), or None: everything the loaders and checks read is there with its type."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return "'splits' is not a mapping"
    for split in SPLITS:
        if not isinstance(splits.get(split), list):
            return f"split {split!r} is missing"
        for entry in splits[split]:
            if not isinstance(entry, dict) or not _is_size(entry.get("bytes")) or \
                    not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("file"), str) or \
                    entry["file"] != Path(entry["file"]).name or entry["file"] in ("", ".", ".."):
                return f"a {split} shard entry is not {{file: NAME, bytes: COUNT, sha256: HEX}}: {entry!r:.80}"
        if manifest.get(f"{split}_bytes") != sum(e["bytes"] for e in splits[split]):
            return f"{split}_bytes is not the sum of its shards' sizes"
    if not isinstance(manifest.get("sources"), list) or not isinstance(manifest.get("parts"), list):
        return "'sources' or 'parts' is not a list"
    return None


def check_shards(data_dir: str | Path, manifest: dict, splits: Iterable[str], sha256: bool) -> None:
    """Every listed shard of these splits exists with its recorded size (and sha256 if asked)."""
    for split in splits:
        for entry in manifest["splits"][split]:
            path = Path(data_dir) / entry["file"]
            if not path.is_file():
                raise DataError(f"{path} is missing but {MANIFEST} lists it; copy the whole folder, or prepare "
                                f"the dataset again")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise DataError(f"{path} holds {size:,} bytes but {MANIFEST} lists {entry['bytes']:,}: it changed "
                                f"after preparation; prepare the dataset again")
            if sha256 and file_sha256(path) != entry["sha256"]:
                raise DataError(f"{path} does not match its sha256 in {MANIFEST}: its contents changed after "
                                f"preparation; prepare the dataset again")


def verify_dataset(data_dir: str | Path, sha256: bool = False) -> dict:
    """Refuse a dataset whose train or val shards differ from the manifest (sizes always, contents
    with sha256=True); returns the manifest. The test split is not read."""
    manifest = read_manifest(data_dir)
    check_shards(data_dir, manifest, ("train", "val"), sha256)
    return manifest


def commit(stage: Stage, manifest: dict, staged: list[dict], replaced: dict | None) -> None:
    """Move this run's staged shards into place, then replace the manifest; with `replaced` (the
    manifest this one supersedes) its shards that are no longer listed are deleted. Refuses, before
    anything moves, when a staged shard is not there whole or a listed shard already in place is missing."""
    out = stage.out
    new = {e["file"] for e in staged}
    for entry in staged:
        path = stage.path(entry["file"])
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise DataError(f"{path} vanished or changed while this run wrote it (another process writing into "
                            f"{out}?); nothing was committed, the dataset is as it was")
    listed = {e["file"] for split in SPLITS for e in manifest["splits"][split]}
    missing = sorted(name for name in listed - new if not (out / name).is_file())
    if missing:
        raise DataError(f"{out / missing[0]} is listed but missing; nothing was committed, the dataset is as it was")
    for name in new:
        os.replace(stage.path(name), out / name)
    tmp = stage.path(MANIFEST)
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)
    folder = os.open(out, os.O_RDONLY)  # the renames must reach the disk too
    os.fsync(folder)
    os.close(folder)
    for split in SPLITS if replaced else ():
        for entry in replaced["splits"].get(split, []):
            if entry["file"] not in listed:
                (out / entry["file"]).unlink(missing_ok=True)

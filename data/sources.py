"""What preparation reads: input paths -> one byte stream of documents, in bounded chunks.

A plain file is one document, a JSONL line or a Parquet row is one (its text field), and
documents are joined by a separator. `.gz`, `.bz2` and `.xz` are decompressed on the fly; the
name without that suffix picks the format (`.jsonl`/`.ndjson`, `.parquet`, anything else is
text). Every error names the file and, where there is one, the line or row.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from data.shards import CHUNK, DataError

DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
JSONL, PARQUET = (".jsonl", ".ndjson"), (".parquet", ".pq")
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}
Progress = Callable[[int], None]  # called with the number of input bytes consumed since the last call


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


def file_format(path: Path) -> tuple[str, Callable | None]:
    """("text" | "jsonl" | "parquet", the decompressing open or None)."""
    suffixes = [s.lower() for s in path.suffixes]
    opener = DECOMPRESS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2 if opener else -1] if len(suffixes) > (1 if opener else 0) else ""
    kind = "jsonl" if inner in JSONL else "parquet" if inner in PARQUET else "text"
    if kind == "parquet" and opener:
        raise DataError(f"{path}: a compressed Parquet file cannot be streamed; decompress it (Parquet compresses "
                        f"its pages itself)")
    return kind, opener


def check_inputs(files: list[Path]) -> None:
    """Fail before anything is written if an input kind cannot be read here (Parquet without pyarrow)."""
    parquet = [f for f in files if file_format(f)[0] == "parquet"]
    if parquet:
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise DataError(f"reading Parquet ({parquet[0]}) needs pyarrow, which is not installed: "
                            f"pip install pyarrow") from None


class _Where:
    """How far a reader got, for error messages."""
    line = 0


def _text(f: BinaryIO, raw: BinaryIO, progress: Progress) -> Iterator[tuple[bool, bytes]]:
    done = 0
    yield True, f.read(CHUNK)
    while chunk := f.read(CHUNK):
        progress(raw.tell() - done)
        done = raw.tell()
        yield False, chunk
    progress(raw.tell() - done)


def _jsonl(path: Path, field: str, f: BinaryIO, raw: BinaryIO, progress: Progress,
           where: _Where) -> Iterator[tuple[bool, bytes]]:
    done = 0
    for where.line, line in enumerate(f, 1):
        if where.line % 4096 == 0:
            progress(raw.tell() - done)
            done = raw.tell()
        if not line.strip():
            continue
        at = f"{path}:{where.line}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{at}: invalid UTF-8 at byte {e.start + 1} of the line") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{at}: not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON "
                            f"object") from None
        if not isinstance(obj, dict) or field not in obj:
            has = f"fields {', '.join(list(obj)[:8]) or 'none'}" if isinstance(obj, dict) else JSON_TYPES[type(obj)]
            raise DataError(f"{at}: no field '{field}' (the line holds {has}); name the text field with "
                            f"--text-field")
        value = obj[field]
        if not isinstance(value, str):
            raise DataError(f"{at}: field '{field}' is {JSON_TYPES[type(value)]}, "
                            f"not a string")
        try:
            yield True, value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{at}: field '{field}' is not valid UTF-8 (it holds a lone surrogate escape such "
                            f"as \\ud800)") from None
    progress(raw.tell() - done)


def _parquet(path: Path, field: str, progress: Progress) -> Iterator[tuple[bool, bytes]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        # pre_buffer keeps the buffers of every row group read so far: memory grew with the file
        pf = pq.ParquetFile(path, pre_buffer=False)
        schema = pf.schema_arrow
        if field not in schema.names:
            raise DataError(f"{path}: no column '{field}' (columns: {', '.join(schema.names[:8])}); name the "
                            f"text column with --text-field")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)):
            raise DataError(f"{path}: column '{field}' holds {kind}, not text")
        per_row = path.stat().st_size / max(pf.metadata.num_rows, 1)
        for batch in pf.iter_batches(batch_size=4096, columns=[field]):
            column = batch.column(0)
            # as bytes, so binary columns (unchecked by Parquet) and text columns are checked alike
            values = column.cast(pa.large_binary()).to_pylist()
            for value in values:
                row += 1
                if value is None:
                    raise DataError(f"{path}: row {row}: '{field}' is null")
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: row {row}: '{field}' is not valid UTF-8 (byte {e.start + 1})") from None
                yield True, value
            progress(round(len(values) * per_row))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file (after row {row}: "
                        f"{str(e).splitlines()[0][:120]})") from None


def _documents(path: Path, field: str, progress: Progress) -> Iterator[tuple[bool, bytes]]:
    """(starts a new document, bytes) pieces of one input file."""
    kind, opener = file_format(path)
    if kind == "parquet":
        yield from _parquet(path, field, progress)
        return
    where = _Where()
    try:
        with open(path, "rb") as raw:
            f = opener(raw) if opener else raw
            if kind == "jsonl":
                yield from _jsonl(path, field, f, raw, progress, where)
            else:
                yield from _text(f, raw, progress)
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        at = f"{path}:{where.line + 1}" if kind == "jsonl" else str(path)  # the line being read
        what = "compressed data is truncated or corrupt" if opener else "cannot be read"
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DataError(f"{at}: {what} ({reason}); re-create or re-download it") from None


def joined_stream(files: list[Path], separator: bytes, field: str, progress: Progress) -> Iterator[bytes]:
    """Every document of every file, in order, joined by separator, as chunks of about CHUNK bytes."""
    buffer, first = bytearray(), True
    for path in files:
        for new_document, data in _documents(path, field, progress):
            if new_document and not first:
                buffer += separator
            first = False
            if len(data) >= CHUNK:  # large reads pass through without a copy
                if buffer:
                    yield bytes(buffer)
                    buffer.clear()
                yield data
            else:
                buffer += data
                if len(buffer) >= CHUNK:
                    yield bytes(buffer)
                    buffer.clear()
    if buffer:
        yield bytes(buffer)

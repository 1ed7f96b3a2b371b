"""Text typed on a command line, as the user meant it."""

from __future__ import annotations

import re

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Backslash escapes as a shell user types them: \n, \t, \r, \0 and \\ are understood; any
    other character, a lone backslash included, stays as typed."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m[1], m[0]), text)


def to_bytes(text: str) -> bytes:
    """Text as the model's byte tokens: UTF-8, with the bytes of a command line that were not UTF-8
    (Python keeps them as lone surrogates) given back as they were typed."""
    return text.encode("utf-8", "surrogateescape")


def undecodable(text: str) -> str | None:
    """Where text holds bytes that were not UTF-8 (kept by Python as lone surrogates), or None. Such a path
    works for open() but not for libraries that encode strictly (TensorBoard, torch.save)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(e.object[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character {e.object[e.start]!r}"
        return f"{what} at position {e.start} is not UTF-8"
    return None


def encoding_problem(text: str) -> str | None:
    """Why text cannot become bytes (a lone surrogate such as a YAML "\\ud800"), or None."""
    try:
        to_bytes(text)
    except UnicodeEncodeError as e:
        return f"character {e.object[e.start]!r} at position {e.start} has no UTF-8 bytes"
    return None

"""Text typed on a command line, as the user meant it."""

from __future__ import annotations

import re

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Backslash escapes as a shell user types them: \n, \t, \r, \0 and \\ are understood; any
    other character, a lone backslash included, stays as typed."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m[1], m[0]), text)

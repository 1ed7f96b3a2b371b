"""No command destroys its own input: the one check every command that writes runs on its output paths
before it writes anything."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from utils.errors import UserError


def _same(a: Path, b: Path) -> bool:
    """One file or folder under two names (a symlink, `..`, a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_output(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse, in one line, an output that is one of the inputs, lies inside one, or holds one (each an input
    this command reads; None is skipped)."""
    out = Path(out)
    target = out.resolve()
    for given in (Path(i) for i in inputs if i is not None):
        source = given.resolve()
        if _same(out, given):
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif target in source.parents:
            relation = "holds"
        else:
            continue
        raise UserError(f"{flag} {out} {relation} the input {given}, which writing it could overwrite or change; "
                        f"choose another {flag}")

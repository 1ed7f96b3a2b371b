"""Measurements taken once per host and kept: a JSON file per kind under ~/.cache/bytegpt/.

A key names everything the figure depends on (CPU model, thread count, torch version, shapes), so
another machine, torch or model measures afresh, and the same one costs nothing the second time.
BYTEGPT_CACHE_DIR moves the folder (tests use it); delete a file to measure again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from utils.device import cpu_model


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bytegpt"
    return Path(os.environ.get("BYTEGPT_CACHE_DIR") or default)


def host_key(*parts: object) -> str:
    """CPU model, threads and torch version, plus what the caller's figure depends on."""
    return " | ".join([cpu_model(), f"{torch.get_num_threads()} threads", f"torch {torch.__version__}",
                       *map(str, parts)])


def cached(kind: str, key: str, measure: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """(entry, where it came from): from the cache file `kind`.json, else measure() and store it.

    A figure measured while the machine is busier than its core count is used but not stored, so a
    busy minute is not kept for good. A cache that cannot be read or written is measured around,
    never an error: the figure is an optimisation, not an input.
    """
    path = cache_dir() / f"{kind}.json"
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    if not isinstance(entries, dict):
        entries = {}
    if key in entries:
        return entries[key], f"cached in {path}"
    entry = measure()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        return entry, f"measured now under load {load:.1f} on {cores} cores, so not cached"
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write then rename, so two processes starting together never leave half a file
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        return entry, f"measured now; {path} is not writable"
    return entry, f"measured now, saved to {path}"

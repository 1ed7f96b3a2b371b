"""The repository's research tools: records, ablations, comparisons with nanoGPT and the memory planner's
check (their own dependencies in requirements-dev.txt). Run from the repository root, as modules
(python -m dev.NAME) or by path."""

import utils  # noqa: F401  the start-up error boundary (utils/__init__.py), before any tool imports torch

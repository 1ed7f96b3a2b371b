"""Command-line tools, run from the repository root as modules: python -m scripts.NAME."""

import utils  # noqa: F401  the start-up error boundary (utils/__init__.py), before any tool imports torch

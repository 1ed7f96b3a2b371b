"""Dataset preparation and loading."""

import utils  # noqa: F401  the start-up error boundary (utils/__init__.py), before numpy and torch load

"""Training infrastructure. Importing this package installs the start-up error boundary
(utils/errors.py): every entry point imports a package of ours before torch, so a Ctrl-C or a
missing dependency while the imports load is one line too."""

import os
import sys


def _interrupted_while_starting(kind: type[BaseException], e: BaseException, tb: object) -> None:
    """Ctrl-C before any run began: one line, exit 130, nothing to save (utils/errors.py keeps this hook for it)."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("error: interrupted while starting; nothing was written\n")
        os._exit(130)  # the interpreter's own exit would print the KeyboardInterrupt again
    sys.__excepthook__(kind, e, tb)


# first: utils/errors.py's own imports take milliseconds that a Ctrl-C can land in
sys.excepthook = _interrupted_while_starting

from utils.errors import install_startup_boundary  # noqa: E402

install_startup_boundary()

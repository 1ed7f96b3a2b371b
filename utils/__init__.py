"""Training infrastructure. Importing this package from one of our entry points installs the start-up
error boundary: every entry point imports a package of ours before torch, so a Ctrl-C or a missing
dependency while the imports load is one line too (utils/errors.py; run_cli takes over from there)."""

import os
import signal
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interrupted_while_starting(signum: int, frame: object) -> None:
    """SIGINT before any run began: one line, exit 130, nothing to save. It exits from the handler itself:
    a KeyboardInterrupt raised while torch's C++ start-up calls back into Python aborts the process."""
    os.write(2, b"error: interrupted while starting; nothing was written\n")
    os._exit(130)


def _an_entry_point() -> bool:
    """Whether this process runs a file of ours (or `python -m` one: argv[0] is "-m" while its package
    loads), not a notebook or a test runner that imports us, whose own Ctrl-C must stay theirs."""
    main = sys.argv[0] if sys.argv else ""
    return main == "-m" or os.path.abspath(main).startswith(_ROOT + os.sep)


# first, before the imports below: a Ctrl-C can land in any millisecond of them (a SIGINT ignored by the
# shell that started us, as for a background job, stays ignored)
if _an_entry_point() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupted_while_starting)

from utils.errors import install_startup_boundary  # noqa: E402

install_startup_boundary()

"""The user-error root and the one error boundary every entry point's main() goes through.

Library code raises a `UserError` subclass with the fix in its message; `run_cli` prints it as
one `error: ...` line and exits 2. An OSError (a full disk, a read-only or missing folder, a
permission) becomes one line naming the path and the errno. Anything else is a bug and keeps its
traceback. Exit codes: 0 done, 2 bad input or environment, 75 preempted with a checkpoint saved,
130 interrupted twice (Ctrl-C), 141 stdout closed early (`| head`), 1 a bug.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from typing import Callable

EXIT_OK = 0
EXIT_USER = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved, run again with --resume auto to continue
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class UserError(Exception):
    """Bad input from the user or the environment: printed as one line, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line through run_cli, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


# every character str.splitlines() breaks on, written as its escape
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(text: str) -> str:
    """A message stays one line even when it quotes user input holding line breaks (of any kind)."""
    return text.translate(_LINE_BREAKS)


def describe_os_error(e: OSError) -> str:
    """'<path>: <reason> (errno ENOSPC)', for an OSError from any file operation."""
    where = e.filename if e.filename is not None else "output"
    code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "?"
    return f"{where}: {e.strerror or e} (errno {code})"


def say(line: str) -> None:
    """Print the one error line; under torchrun also hand it to the launcher (its error file), so the
    failure report torchrun prints last names this line instead of "To enable traceback see ..."."""
    print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the report then says less; the line above was printed all the same


def run_cli(body: Callable[[], int]) -> int:
    """Run an entry point's body and turn user errors into one line and an exit code."""
    try:
        return body()
    except UserError as e:
        say(f"error: {one_line(str(e))}")
        return EXIT_USER
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly; point stdout at /dev/null so the
        # interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:
        say(f"error: {one_line(describe_os_error(e))}; check that the folder exists, is writable and has free space")
        return EXIT_USER
    except KeyboardInterrupt:
        say("error: interrupted; nothing was saved by this interruption (earlier checkpoints are intact)")
        return EXIT_INTERRUPTED

"""The user-error root and the one error boundary every entry point's main() goes through.

Library code raises a `UserError` subclass with the fix in its message; `run_cli` prints it as
one `error: ...` line and exits 2. An OSError (a full disk, a read-only or missing folder, a
permission) becomes one line naming the path and the errno; running out of memory, one line saying so.
Anything else is a bug: one line saying so, its type and message, and the file its full traceback
was written to. `install_startup_boundary` extends the same to the imports before main() runs (a
Ctrl-C while torch loads, a missing dependency). Exit codes: 0 done, 2 bad input or environment,
75 preempted with a checkpoint saved, 130 interrupted (Ctrl-C), 141 stdout closed early (`| head`), 1 a bug.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from types import TracebackType
from pathlib import Path
from typing import Callable

from utils.text import undecodable

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved, run again with --resume auto to continue
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class UserError(Exception):
    """Bad input from the user or the environment: printed as one line, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line through run_cli, like every other user error. Every numeric
    argument takes its `type` from `number`, so no script sees inf, nan or a count that is not whole."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def number(kind: type[int] | type[float], low: float, high: float, unit: str,
           above: bool = False) -> Callable[[str], int | float]:
    """An argparse `type`: a finite `kind` (int: a whole number, written as one) from `low` (excluded when `above`)
    to `high`, its unit named in the refusal."""
    def show(x: float) -> str:
        return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"

    bounds = f"above {show(low)} and at most {show(high)}" if above else f"from {show(low)} to {show(high)}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except (ValueError, OverflowError):  # "2.5" for a count, "x", an int of 5000 digits
            value = None
        # comparisons with nan are false: nan and inf fail here too
        if value is None or not ((low < value) if above else (low <= value)) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'} {bounds} "
                                             f"({unit}), got {one_line(text)[:40]!r}")
        return value

    parse.__name__ = unit  # what argparse names in its own messages
    return parse


def utf8_text(text: str) -> str:
    """An argparse `type` for a path or other text a library encodes strictly (TensorBoard and torch.save a path,
    matplotlib a title): bytes that are not UTF-8 are refused at start, not after work was done and files written."""
    problem = undecodable(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem} ({one_line(text)[:60]!r}); give UTF-8 text (a path: rename the file)")
    return text


def _escape(c: str) -> str:
    """A character a terminal would not show as itself (a line break of any kind, a control or NUL, an
    unpaired surrogate from undecodable argv bytes), as its escape; any other character unchanged."""
    if c.isprintable():
        return c
    return repr(c)[1:-1] if c.isascii() else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def one_line(text: str) -> str:
    """A message stays one visible line even when it quotes user input holding line breaks or control bytes."""
    return "".join(map(_escape, text)) if not text.isprintable() else text


def child_error(proc: subprocess.CompletedProcess) -> str:
    """What a failed child process said last on stderr (its one error line), as one line; else its exit code."""
    lines = (proc.stderr or "").strip().splitlines()
    return one_line(lines[-1]) if lines else f"exit {proc.returncode}"


def describe_os_error(e: OSError) -> str:
    """'<path>: <reason> (errno ENOSPC)', for an OSError from any file operation."""
    where = e.filename if e.filename is not None else "output"
    code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "?"
    return f"{where}: {e.strerror or e} (errno {code})"


def say(line: str) -> None:
    """Print the one error line; under torchrun also hand it to the launcher (its error file), so the
    failure report torchrun prints last names this line instead of "To enable traceback see ..."."""
    # one write: print sends the newline apart, and lines of ranks that fail together would interleave
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # whole or absent, never half written: torchrun's agent dies reading a partial file, and its SIGTERM
        # can end this rank mid-write; a temporary of this thread's own, so two reporting threads do not mix
        tmp = f"{error_file}.{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
            os.replace(tmp, error_file)
        except OSError:
            pass  # the report then says less; the line above was printed all the same


def require_stdout(what: str) -> None:
    """For a tool whose product is its standard output: refuse to start when there is none (`>&-`)."""
    if sys.stdout is None:
        raise UserError(f"standard output is closed, so {what} would go nowhere; redirect it to a file instead")


def report_bug(kind: type[BaseException], e: BaseException, tb: TracebackType | None) -> int:
    """A bug: one line naming it and the file its full traceback went to (the terminal only if no file
    can be written). Returns the exit code."""
    text = "".join(traceback.format_exception(kind, e, tb))
    prog = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"
    name = f"bytegpt-{prog}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.traceback"
    try:
        path = Path(tempfile.gettempdir()) / name
        path.write_text(text)
        where = f"its traceback is in {path}"
    except OSError:
        print(text, file=sys.stderr, end="")
        where = "its traceback is above"
    say(f"error: a bug, not your input: {one_line(f'{kind.__name__}: {e}')[:500]}; {where}; please report it")
    return EXIT_BUG


def _uncaught(kind: type[BaseException], e: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):  # outside run_cli and after start-up (utils/__init__.py exits at once)
        say("error: interrupted; nothing was saved by this interruption")
        os._exit(EXIT_INTERRUPTED)
    if issubclass(kind, UserError):  # raised outside run_cli (an entry point parsing its flags first)
        say(f"error: {one_line(str(e))}")
        os._exit(EXIT_USER)
    if issubclass(kind, ImportError) and getattr(e, "name", None):
        say(f"error: {one_line(str(e))}; install the requirements: pip install -r requirements.txt")
        os._exit(EXIT_USER)
    report_bug(kind, e, tb)


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, OSError):
        return  # a writer thread's full disk: its owner raises it again at the next write (TensorBoard does)
    report_bug(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)


def install_startup_boundary() -> None:
    """From here until run_cli takes over, an exception no code catches is one line too: a Ctrl-C while the
    imports load (torch takes seconds), a missing dependency, a bug at import; and, for the whole run, one
    in a background thread. Run by importing any package of ours (utils/__init__.py), which every entry
    point does before it imports torch."""
    sys.excepthook = _uncaught
    threading.excepthook = _thread_failed


def run_cli(body: Callable[[], int]) -> int:
    """Run an entry point's body and turn every failure into one line and an exit code."""
    if getattr(signal.getsignal(signal.SIGINT), "__module__", None) == "utils":  # the start-up one: now a Ctrl-C
        signal.signal(signal.SIGINT, signal.default_int_handler)  # is a KeyboardInterrupt again, handled below
    try:
        return body()
    except UserError as e:
        say(f"error: {one_line(str(e))}")
        return EXIT_USER
    except MemoryError:
        say("error: out of memory: this request needs more memory than the machine has; ask for less "
            "(a smaller batch, model, sample count or length)")
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
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's (CUDA, MPS), without importing torch here
            say(f"error: out of memory on the device: {one_line(str(e).splitlines()[0])}; ask for less "
                f"(a smaller batch, model, sample count or length)")
            return EXIT_USER
        return report_bug(type(e), e, e.__traceback__)

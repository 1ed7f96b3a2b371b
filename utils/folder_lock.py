"""One writer per folder: a folder is claimed before anything is written into it, and released after.

The claim is the file `<folder>/.writer.lock`, naming its holder: host, pid, the process's start time and
what it is doing. It appears whole or not at all (the record is written to a file of the holder's own
name, then hard-linked to the lock name, which fails if the name exists: O_EXCL's atomicity, including on
NFS). A lock whose holder is gone is stale, and the next claim takes it over:
- on this host, when no process has the pid, or the pid's start time differs (a reused pid);
- held from another host (a shared filesystem), when its heartbeat is older than STALE_AFTER_S: the holder
  touches the file every HEARTBEAT_S, and a pid on another machine cannot be asked.
Taking over a stale lock happens under a second lock (`.writer.lock.break`), so two processes that find the
same stale lock cannot both take it. A process killed in those milliseconds leaves that second lock, which
is itself taken over when stale, by the same rules.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from utils.errors import UserError

LOCK = ".writer.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: the holder on another host is gone (or its clock is far off)


class FolderBusy(UserError):
    """Another live process holds the folder."""


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot; "" where the system does not say), or None when no
    live process has the pid (a zombie is dead: it only waits for its parent to collect it)."""
    if Path("/proc/self/stat").exists():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after the command name
        except (OSError, IndexError):
            return None
        return None if fields[0] in "ZX" else fields[19]  # state; starttime, field 22 of proc(5)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: it exists
        pass
    return ""


def _read(path: Path) -> tuple[dict | None, float]:
    """(record, mtime) of a lock file; (None, mtime) while it cannot be parsed; raises FileNotFoundError."""
    mtime = path.stat().st_mtime
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None, mtime
    return (record if isinstance(record, dict) else None), mtime


def _alive(record: dict | None, mtime: float) -> bool:
    if record is not None and record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        start = _start_time(record["pid"])
        return start is not None and (start == "" or start == record.get("start"))
    return time.time() - mtime < STALE_AFTER_S  # another host, or a record we cannot read: its heartbeat decides


def _describe(record: dict | None) -> str:
    """The holder, as a refusal names it."""
    if record is None:
        return "a process whose lock record cannot be read"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"{record.get('what', '?')} (pid {record.get('pid')} on {record.get('host')}, since {since})"


class FolderLock:
    """The claim on one folder; `acquire` creates the folder if needed. Use as a context manager, or call
    acquire() and release() (which is idempotent)."""

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK
        self.token = secrets.token_hex(8)
        self.created: list[Path] = []  # the folders acquire made, deepest first: release removes them if still empty
        self._stop: threading.Event | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()) or "",
                "since": time.time(), "what": self.what, "token": self.token}

    def _link(self, target: Path) -> bool:
        """Create `target` holding this process's record, whole, unless it exists."""
        mine = self.folder / f"{LOCK}.{self.token}"
        mine.write_text(json.dumps(self._record()))
        try:
            os.link(mine, target)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL, then the record (readers wait for it)
            try:
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(mine.read_text())
            return True
        finally:
            mine.unlink(missing_ok=True)

    def acquire(self) -> FolderLock:
        """Claim the folder, taking over a stale lock; raises FolderBusy naming a live holder."""
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(50):  # each turn either claims, or finds a holder that vanished meanwhile, or waits out a break
            if self._link(self.path):
                self._start_heartbeat()
                return self
            try:
                record, mtime = _read(self.path)
            except FileNotFoundError:
                continue  # released meanwhile
            if _alive(record, mtime):
                if record is None and time.time() - mtime < 1:
                    time.sleep(0.05)  # written this instant: a holder on a filesystem without atomic links
                    continue
                self._give_up()
                raise FolderBusy(f"{self.folder} is in use by {_describe(record)}; wait for it to finish, or use "
                                 f"another folder (a lock left by a crashed process on another host counts as "
                                 f"abandoned {STALE_AFTER_S / 60:.0f} minutes after its last heartbeat)")
            self._break(record)
        self._give_up()
        raise FolderBusy(f"{self.folder}: could not claim it ({self.path} keeps changing hands); try again")

    def _break(self, stale: dict | None) -> None:
        """Remove the stale lock, if it is still the one judged stale, under the breaker's lock."""
        breaker = self.path.with_name(f"{LOCK}.break")
        if not self._link(breaker):
            try:
                if not _alive(*_read(breaker)):
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.02)
            return
        try:
            if _read(self.path)[0] == stale:
                self.path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        finally:
            breaker.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()

        def beat(stop: threading.Event) -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # the folder went away or turned read-only: the owner's next write says so

        threading.Thread(target=beat, args=(self._stop,), name="folder-lock-heartbeat", daemon=True).start()

    def _give_up(self) -> None:
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break  # no longer empty: someone else's now
        self.created = []

    def release(self) -> None:
        """Give the folder back: the lock goes if it is still this claim's; a folder acquire made and nothing
        filled is removed again."""
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        try:
            record, _ = _read(self.path)
            if record is not None and record.get("token") == self.token:
                self.path.unlink()
        except OSError:
            pass  # gone already, or the folder is unreadable: a later claim judges it stale
        self._give_up()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


"""Dead-rank detection: every rank holds one TCP connection to a watchdog thread on rank 0, and a rank
that ends without saying goodbye ends the others within seconds, with one line naming it.

Without it, the survivors of a dead rank wait in their next collective: NCCL until its timeout
(distributed.timeout_s), gloo until it notices, with a traceback that hides the cause. The connection
is the liveness signal because the kernel closes it the moment a process ends, however it ends, and
answers TCP keepalives for a process that is alive but busy (a long checkpoint save, a slow first
compile), so slowness never reads as death; keepalives also notice a lost host, within KEEPALIVE_S.
Messages are lines: "<rank>" (hello), "bye" (a finished or agreed stop), and, from rank 0 to the
others, "lost <rank>", so that every survivor names the rank that ended, not rank 0.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import threading

import torch.distributed as dist

from utils.errors import say

PORT_KEY = "bytegpt/watchdog_port"
EXIT_RANK_LOST = 1
GRACE_S = 5.0  # a rank that fails itself meanwhile reports its own error instead (see depart)
PEER_GONE_S = 30.0  # a collective said a peer's connection closed: the watchdog names the rank within this
KEEPALIVE_S = (10, 5, 3)  # idle, interval, probes: a silent host counts as lost after about 25 s
BYE_WAIT_S = 60.0  # rank 0 hosts the store: after a finished run it waits for the others to leave first
BYE, LOST = b"bye", b"lost"


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE_S):
        if hasattr(socket, name):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class Watchdog:
    """Started by every rank of a group once its store is up; ends this process if another rank ends early."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, host: str) -> None:
        self.rank, self.world_size = rank, world_size
        self.lost_rank: int | None = None
        self._lost, self._failing, self._done = threading.Event(), threading.Event(), threading.Event()
        self._report = threading.Lock()  # one line, whichever thread reports
        if rank == 0:
            self._peers: dict[socket.socket, int | None] = {}  # connection -> rank, once it said hello
            self._left = 0
            self._all_left = threading.Event()
            family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
            self._listener = socket.create_server(("", 0), family=family, dualstack_ipv6=family == socket.AF_INET6)
            store.set(PORT_KEY, str(self._listener.getsockname()[1]))
            target = self._watch_peers
        else:
            self._conn = socket.create_connection((host, int(store.get(PORT_KEY))))
            _keepalive(self._conn)
            self._conn.sendall(f"{rank}\n".encode())
            target = self._watch_rank0
        threading.Thread(target=target, name="rank-watchdog", daemon=True).start()

    def _watch_peers(self) -> None:
        """Rank 0: accept each rank's connection, then wait for its bye or its end."""
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        buffers: dict[socket.socket, bytes] = {}
        while not self._done.is_set():
            for key, _ in sel.select():
                sock = key.fileobj
                if sock is self._listener:
                    try:
                        conn, _ = self._listener.accept()
                    except OSError:
                        return  # closed by stop()
                    _keepalive(conn)
                    self._peers[conn], buffers[conn] = None, b""
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                data = self._recv(sock)
                *lines, buffers[sock] = (buffers[sock] + data).split(b"\n")
                for line in lines:
                    if line == BYE:
                        self._peers.pop(sock, None)
                        self._left += 1
                        if self._left == self.world_size - 1:
                            self._all_left.set()
                    elif line.isdigit():
                        self._peers[sock] = int(line)
                if not data:
                    sel.unregister(sock)
                    if sock in self._peers:
                        rank = self._peers.pop(sock)
                        self._depart(-1 if rank is None else rank)
                        return

    def _watch_rank0(self) -> None:
        """Every other rank: wait for rank 0's bye, its word of a lost rank, or its end."""
        data = b""
        while not data.startswith(BYE):
            chunk = self._recv(self._conn)
            data += chunk
            if data.startswith(LOST) and data.endswith(b"\n"):
                return self._depart(int(data.split()[1]))
            if not chunk:
                return self._depart(0)

    def _recv(self, sock: socket.socket) -> bytes:
        try:
            return sock.recv(256)
        except OSError:  # reset by a dead peer, or closed by stop()
            return b""

    def _depart(self, rank: int) -> None:
        """A rank ended without a goodbye. Unless this rank is finishing or failing on its own within
        GRACE_S (then its own message is the one to read), end this process: its next collective would
        wait for the rank that is gone."""
        if self._done.is_set():
            return
        self.lost_rank = rank
        self._lost.set()
        if self.rank == 0:
            for conn in self._peers:
                with contextlib.suppress(OSError):  # that one is gone too; the others still hear
                    conn.sendall(LOST + f" {rank}\n".encode())
        if not self._failing.wait(GRACE_S):
            self.exit_lost()

    def exit_lost(self) -> None:
        with self._report:
            with contextlib.suppress(OSError, ValueError):  # stdout may be a closed pipe by now
                sys.stdout.flush()
            who = {-1: "a rank that had not said hello", None: "another rank"}.get(self.lost_rank,
                                                                                  f"rank {self.lost_rank}")
            say(f"error: {who} ended before the run finished (killed, crashed or its host lost; see its own "
                f"output); stopping rank {self.rank} as well")
            os._exit(EXIT_RANK_LOST)

    def stop(self, finished: bool, error_may_be_a_peers: bool = False, peer_gone: bool = False) -> None:
        """Leave the group. Finished: say goodbye; rank 0 first lets the others leave, since their process
        group still talks to the store it hosts. Failed: no goodbye, so the others stop too; and where the
        error may come from a peer (a collective that failed), wait GRACE_S for news of a rank that ended,
        which is then the one line to report instead of the error. peer_gone: the backend itself said a peer's
        connection closed, so a rank did end: wait up to PEER_GONE_S to name it (a busy machine may deliver the
        backend's error first), and report the loss either way."""
        if finished and self.rank == 0:
            self._all_left.wait(BYE_WAIT_S)
        if not finished:
            self._failing.set()
            wait = PEER_GONE_S if peer_gone else GRACE_S if error_may_be_a_peers else 0
            if wait and (self._lost.wait(wait) or peer_gone):
                self.exit_lost()
        self._done.set()
        for conn in list(self._peers) if self.rank == 0 else [self._conn]:
            with contextlib.suppress(OSError):
                if finished:
                    conn.sendall(BYE + b"\n")
                conn.close()
        if self.rank == 0:
            self._listener.close()

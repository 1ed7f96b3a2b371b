"""The TCPStore a process group starts from: a new one for every group, so a restarted group never reads
the keys of the group before it.

torchrun (c10d and static rendezvous, torch >= 2.4) hands its workers the agent's own TCPStore, and that
store outlives restarts. A restarted group then finds the previous group's keys, gloo's peer addresses or
NCCL's unique id, and dials processes that are dead: "connectFullMesh failed ... Connection refused", or a
hang (pytorch/pytorch#135712, #167288). TORCHELASTIC_RESTART_COUNT cannot name the group, because each
agent counts its own restarts and a node restarted for a membership change keeps its count. So rank 0
starts a fresh store on a free port and announces it through the agent's store; an announcement left by
an earlier group names a store that died with its rank 0, and the other ranks read the key again.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

ANNOUNCE_KEY = "bytegpt/group_store"  # in the agent's store: "<port> <nonce>" of the current group's store
NONCE_KEY = "bytegpt/nonce"  # in the group's store: proves a store found at an announced port is that one
PROBE = timedelta(seconds=3)  # an announced store is up before it is announced, so this only waits out load


def group_store(rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """A store at MASTER_ADDR that only this group's ranks have written to; rank 0 hosts it."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # plain processes (srun, or torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): a new store per launch
        return dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    agent = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = uuid.uuid4().hex
        store.set(NONCE_KEY, nonce)
        agent.set(ANNOUNCE_KEY, f"{store.port} {nonce}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        announced_port, nonce = agent.get(ANNOUNCE_KEY).decode().split()
        try:
            # a plain connect first: an earlier group's store is gone, and TCPStore would log each retry
            socket.create_connection((host, int(announced_port)), timeout=PROBE.total_seconds()).close()
            store = dist.TCPStore(host, int(announced_port), world_size, is_master=False, timeout=PROBE)
            if store.get(NONCE_KEY).decode() == nonce:
                store.set_timeout(timeout)
                return store
        except (OSError, dist.DistError):
            pass  # an earlier group's store: gone, or its port now serves another store
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 announced no live process-group store within {timeout}")
        time.sleep(0.1)  # rank 0 of this group has not announced yet; it overwrites the stale key soon

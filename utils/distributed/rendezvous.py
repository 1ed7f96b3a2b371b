"""Where a process group meets: each process's rank (torchrun, plain srun, or a single process), the
address of rank 0, and the TCPStore the group starts from, a new one for every group, so that a
restarted group never reads the keys of the group before it.

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
import re
import socket
import time
import uuid
from datetime import timedelta
from typing import Mapping

import torch.distributed as dist

from utils.errors import UserError

JOINED_KEY = "bytegpt/joined"  # in the group's store: how many ranks have arrived
ANNOUNCE_KEY = "bytegpt/group_store"  # in the agent's store: "<port> <nonce>" of the current group's store
NONCE_KEY = "bytegpt/nonce"  # in the group's store: proves a store found at an announced port is that one
PROBE = timedelta(seconds=3)  # an announced store is up before it is announced, so this only waits out load


def env_ranks(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun, else from srun, else a single process.

    Under plain srun (no torchrun) the rendezvous address is the allocation's first node.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    elif _whole(env, "SLURM_NTASKS", "1") > 1 and "SLURM_PROCID" in env:
        names = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
    else:
        return 0, 0, 1
    rank, local_rank, world_size = (_whole(env, name, "0") for name in names)
    if not 0 <= rank < world_size or local_rank < 0:
        raise UserError(f"{names[0]}={rank}, {names[1]}={local_rank} and {names[2]}={world_size} describe no process "
                        f"of a group (0 <= rank < world size); start the processes with torchrun or srun")
    return rank, local_rank, world_size


def _whole(env: Mapping[str, str], name: str, default: str) -> int:
    """A launcher's variable as a number, or one line naming it."""
    try:
        return int(env.get(name, default))
    except ValueError:
        raise UserError(f"{name}={env[name][:40]!r} is not a whole number; it is set by the launcher (torchrun, "
                        f"srun): start the run through one, or set it to a number") from None


def master_address() -> tuple[str, int]:
    """(host, port) of rank 0's store: MASTER_ADDR (torchrun's, or the first node of a SLURM allocation)
    and MASTER_PORT (default 29500)."""
    if "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
        os.environ["MASTER_ADDR"] = slurm_master_addr(os.environ["SLURM_JOB_NODELIST"])
    if "MASTER_ADDR" not in os.environ:
        raise UserError("MASTER_ADDR is not set, so the ranks cannot meet: launch with torchrun (or srun), or set "
                        "MASTER_ADDR and MASTER_PORT to rank 0's host and a free port")
    port = _whole(os.environ, "MASTER_PORT", "29500")
    if not 0 < port < 65536:
        raise UserError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return os.environ["MASTER_ADDR"], port


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[03-05,9],cpu1' -> 'gpu03' (as `scontrol show hostnames`)."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist).group(0)  # up to the first comma outside brackets
    # every bracket, e.g. both in 'rack[1-2]-node[01-04]', starts at its first number
    return re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", first)


def join(rank: int, world_size: int, timeout: timedelta) -> tuple[dist.TCPStore, str]:
    """The group's store once every rank has reached it, and rank 0's host; one UserError line on every rank
    that waited `timeout` in vain (for rank 0's store, or for the last ranks), saying what it saw."""
    deadline = time.monotonic() + timeout.total_seconds()
    address = master_address()
    unanswered = UserError(f"rank {rank}: rank 0's store at {address[0]}:{address[1]} did not answer within "
                           f"{timeout.total_seconds():.0f} s (distributed.join_timeout_s); rank 0 may have been "
                           f"refused at start (see its error) or MASTER_ADDR/MASTER_PORT may be wrong")
    while rank != 0:  # a plain connect first: TCPStore would log every retry, a C++ traceback each
        try:
            socket.create_connection(address, timeout=PROBE.total_seconds()).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise unanswered from None
            time.sleep(0.1)
    try:
        store, host = group_store(rank, world_size, timeout)
    except (dist.DistError, RuntimeError, TimeoutError):  # DistError: torch >= 2.3; older raise RuntimeError
        raise unanswered from None
    store.add(JOINED_KEY, 1)
    while (joined := store.add(JOINED_KEY, 0)) < world_size:
        if time.monotonic() > deadline:
            raise UserError(f"rank {rank}: only {joined} of {world_size} ranks joined within "
                            f"{timeout.total_seconds():.0f} s (distributed.join_timeout_s); a rank may have been "
                            f"refused at start (see its error), or the launch started fewer processes than WORLD_SIZE")
        time.sleep(0.05)
    return store, host


def group_store(rank: int, world_size: int, timeout: timedelta) -> tuple[dist.TCPStore, str]:
    """A store that only this group's ranks have written to, hosted by rank 0, and rank 0's host."""
    host, port = master_address()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # plain processes (srun, or torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): a new store per launch
        return dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                             wait_for_workers=False), host
    agent = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = uuid.uuid4().hex
        store.set(NONCE_KEY, nonce)
        agent.set(ANNOUNCE_KEY, f"{store.port} {nonce}")
        return store, host
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        announced_port, nonce = agent.get(ANNOUNCE_KEY).decode().split()
        try:
            # a plain connect first: an earlier group's store is gone, and TCPStore would log each retry
            socket.create_connection((host, int(announced_port)), timeout=PROBE.total_seconds()).close()
            store = dist.TCPStore(host, int(announced_port), world_size, is_master=False, timeout=PROBE)
            if store.get(NONCE_KEY).decode() == nonce:
                store.set_timeout(timeout)
                return store, host
        except (OSError, dist.DistError):
            pass  # an earlier group's store: gone, or its port now serves another store
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 announced no live process-group store within {timeout}")
        time.sleep(0.1)  # rank 0 of this group has not announced yet; it overwrites the stale key soon

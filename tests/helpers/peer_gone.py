"""One rank of a two-rank watchdog (utils/distributed/watchdog.py), with no training around it, to test
what a rank does when its collective said "a peer's connection closed" (Watchdog.stop(peer_gone=True)).

    python tests/helpers/peer_gone.py 0 DIE_AFTER_S    rank 0: hosts the store, prints "port N", ends by
                                                       os._exit after DIE_AFTER_S (never, if negative)
    python tests/helpers/peer_gone.py 1 PORT           rank 1: joins, then fails as a collective would

The waits are shortened (GRACE_S 0.5 s, PEER_GONE_S 4 s) so a test can tell them apart in seconds.
"""

import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from utils.distributed import watchdog

watchdog.GRACE_S, watchdog.PEER_GONE_S = 0.5, 4.0
HOST = "127.0.0.1"

rank, arg = int(sys.argv[1]), float(sys.argv[2])
store = dist.TCPStore(HOST, 0 if rank == 0 else int(arg), 2, rank == 0, timedelta(seconds=30),
                      wait_for_workers=False)
dog = watchdog.Watchdog(store, rank, 2, HOST)
if rank == 0:
    print(f"port {store.port}", flush=True)
    store.wait(["joined"])  # rank 1 has connected to the watchdog
    if arg >= 0:
        time.sleep(arg)
        os._exit(3)
    time.sleep(60)
else:
    store.set("joined", "1")
    print(f"failing at {time.monotonic()}", flush=True)  # CLOCK_MONOTONIC: the test's clock too
    dog.stop(finished=False, peer_gone=True)  # ends this process: the next line is never reached
    print("stop returned", flush=True)

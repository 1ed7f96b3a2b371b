"""Run train_single.py, but SIGKILL the process while it saves step KILL_AT_STEP: after the bytes
are written to the temporary file and before the rename, the worst moment for a crash."""

import os
import signal
import sys
from pathlib import Path


import utils.checkpoint.folder as checkpointer
import train_single

target = f"step_{int(os.environ['KILL_AT_STEP']):07d}.pt"
real_save = checkpointer.save_checkpoint


def save_then_die(state: dict, path) -> None:
    if Path(path).name == target:
        real_fsync = os.fsync
        os.fsync = lambda fd: (real_fsync(fd), os.kill(os.getpid(), signal.SIGKILL))
    real_save(state, path)


checkpointer.save_checkpoint = save_then_die
sys.exit(train_single.main())

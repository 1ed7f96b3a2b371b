"""train_ddp.py inside a memory cgroup of its own, for tests/test_memory_cap.py.

    MEMORY_CGROUPS=PREFIX  the process first moves itself into the cgroup folder PREFIX<LOCAL_RANK> (made
                           and capped by the test), before anything else is imported: all it holds counts

Under torchrun each rank has its own folder, so the cap is per process as a GPU's memory is per rank.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    folder = Path(os.environ["MEMORY_CGROUPS"] + os.environ.get("LOCAL_RANK", "0"))
    (folder / "cgroup.procs").write_text(str(os.getpid()))
    import train_ddp

    sys.exit(train_ddp.main())

"""train_ddp.py, with the overrides in $RANK1_OVERRIDES appended on rank 1 only: ranks that disagree."""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if os.environ.get("RANK") == "1":
    sys.argv += os.environ["RANK1_OVERRIDES"].split()
sys.argv[0] = str(ROOT / "train_ddp.py")
sys.path.insert(0, str(ROOT))
runpy.run_path(sys.argv[0], run_name="__main__")

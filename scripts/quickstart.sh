#!/usr/bin/env bash
# The quick start: install, prepare the built-in corpus, train a small model on CPU (~3 minutes on
# 2 cores; a GPU is used if present), and sample from the checkpoint it wrote.
#   bash scripts/quickstart.sh                     # extra args are config overrides, e.g. train.max_steps=50
# Re-running continues the same run (--resume auto) instead of overwriting it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m data.prepare_dataset
python train_single.py --config configs/cpu_quickstart.yaml --resume auto "$@"
python inference.py --checkpoint checkpoints/quickstart/best_model.pt --prompt "The " --max-new-tokens 300 --seed 0

#!/usr/bin/env bash
# A record track's first minutes, then its training speed; scripts/gpu_check.sh's sibling for the GPU tracks:
#   bash dev/gpu_track.sh configs/enwik8_1gpu.yaml 180                       # on enwik8 (records/README.md)
#   bash dev/gpu_track.sh configs/enwik8_1gpu.yaml 180 data.dir=data/default  # no enwik8 at hand
# Trains CONFIG (with any key=value overrides, or --device) for SECONDS of wall time in a scratch folder; the
# timeout's SIGTERM makes the trainer save and stop as a preempted job would. Then prints one line: steps,
# median tokens/s and MFU over the logged intervals after the first (compiling and warm-up), the last train
# loss. Exit status: the training's own when it failed, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if (( $# < 2 )) || ! [[ $2 =~ ^[0-9]+$ ]] || (( $2 < 1 )); then
    echo "error: usage: bash dev/gpu_track.sh CONFIG SECONDS [key=value ...] (SECONDS a whole number >= 1)" >&2
    exit 2
fi
config=$1 seconds=$2
shift 2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
timeout -s TERM --kill-after=120 "$seconds" "$PYTHON" train_single.py --config "$config" "$@" \
    "logging.dir=$out/logs" "checkpoint.dir=$out/ckpt" eval.sample_tokens=0
rc=$?
(( rc == 124 )) && rc=0  # the SIGTERM stopped it: the planned steps were never the point
(( rc != 0 )) && exit "$rc"
"$PYTHON" - "$out/logs" "$config" <<'PY'
import statistics, sys
from utils.errors import UserError
from dev.runs import read_metrics
try:
    rows = read_metrics(sys.argv[1])
except UserError:  # stopped before its logger started
    rows = []
train = [r for r in rows if "train/tokens_per_sec" in r]
if not train:
    sys.exit(f"error: {sys.argv[2]} logged no training step in the time given; give it more SECONDS")
steady = train[1:] or train
mfu = [r["train/mfu"] for r in steady if r.get("train/mfu") == r.get("train/mfu")]  # NaN: no known peak
print(f"track {sys.argv[2]}: {train[-1]['step']} steps in {train[-1]['train/seconds']:.1f} s of training | "
      f"{statistics.median(r['train/tokens_per_sec'] for r in steady):,.0f} tokens/s | "
      f"MFU {f'{100 * statistics.median(mfu):.1f}%' if mfu else 'n/a (no known peak for this device)'} | "
      f"train loss {train[-1]['train/loss']:.4f}")
PY

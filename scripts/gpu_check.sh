#!/usr/bin/env bash
# The GPU acceptance run, one command on whatever CUDA GPU the machine has (about 5-8 minutes):
#   bash scripts/gpu_check.sh                      # tests/test_cuda.py, then the benchmark matrix
#   NANOGPT=/tmp/nanoGPT bash scripts/gpu_check.sh # also the side-by-side with nanoGPT's train.py
# It prints a dated markdown section for docs/benchmarks.md (device, tokens/s, MFU against the
# datasheet peak, peak memory). Without a CUDA device it says so and exits 0.
# Exit status: 0 when every test passed (or there is no GPU), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! why=$("$PYTHON" -c 'import torch, sys
ok = torch.cuda.is_available()
print("" if ok else f"no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda})")
sys.exit(0 if ok else 1)'); then
    echo "gpu_check: skipped: $why"
    exit 0
fi
[ -f data/default/train.bin ] || "$PYTHON" -m data.prepare_dataset >/dev/null || exit 1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== tests/test_cuda.py" >&2
timeout 300 "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py >&2
tests_rc=$?

echo "== benchmark matrix" >&2
bench() {  # name, then benchmark.py arguments; one JSON line per case into $out/results.jsonl
    local name=$1; shift
    if line=$(timeout 150 "$PYTHON" -m scripts.benchmark --device cuda --steps 20 --warmup 5 "$@" | tail -n 1); then
        echo "{\"case\": \"$name\", \"result\": $line}" >> "$out/results.jsonl"
    else
        echo "{\"case\": \"$name\", \"result\": null}" >> "$out/results.jsonl"
    fi
}
D="--config configs/default_config.yaml train.batch_size=32"
bench "default 32x512, bf16" $D train.precision=auto
bench "default 32x512, bf16, compiled" $D train.precision=auto train.compile=true
bench "default 32x512, fp32 (TF32)" $D train.precision=fp32
bench "GPT-2 small 16x1024, bf16, compiled" --config configs/gpt2_small.yaml
if [ -n "${NANOGPT:-}" ]; then
    timeout 150 "$PYTHON" -m scripts.vs_nanogpt --nanogpt "$NANOGPT" --device cuda --rounds 3 --compiled \
        --config configs/default_config.yaml train.batch_size=32 train.precision=auto | tail -n 1 > "$out/vs_nanogpt.json"
fi

"$PYTHON" - "$out" "$tests_rc" <<'EOF'
import json, os, sys, time
from pathlib import Path
out, tests_rc = Path(sys.argv[1]), int(sys.argv[2])
rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
first = next((r["result"] for r in rows if r["result"]), None)
print(f"\n## {time.strftime('%Y-%m-%d')} · {first['device'] if first else 'GPU'} · torch {first['torch'] if first else '?'}"
      f" · scripts/gpu_check.sh\n")
print(f"tests/test_cuda.py: {'passed' if tests_rc == 0 else f'FAILED (pytest exit {tests_rc})'}; "
      f"load {os.getloadavg()[0]:.2f}; median of 20 steps after 5 warm-up.\n")
print("| case | precision | compile | ms/step | tokens/s | MFU (datasheet peak) | peak memory MiB |")
print("|---|---|---|---:|---:|---:|---:|")
for row in rows:
    r = row["result"]
    if r is None:
        print(f"| {row['case']} | failed or timed out | | | | | |")
        continue
    mfu = "n/a (GPU not in PEAK_FLOPS)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"| {row['case']} | {r['precision']} | {r['compile']} | {r['ms_per_step']} | {r['tokens_per_sec']:,.0f} | "
          f"{mfu} | {r['peak_memory_mib']:,.0f} |")
vs = out / "vs_nanogpt.json"
if vs.exists() and vs.read_text().strip():
    s = json.loads(vs.read_text())
    print(f"\nAgainst nanoGPT's train.py (default model, 32x512, median of {len(s['pairs'])} pairs): "
          f"**{s['median_ratio']}x** its tokens/s ({s['our_tokens_per_sec']:,.0f} vs {s['nanogpt_tokens_per_sec']:,.0f}).")
EOF
exit $(( tests_rc != 0 ))

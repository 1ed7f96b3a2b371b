#!/usr/bin/env bash
# The GPU acceptance run, one command on one CUDA GPU; prints one table (docs/benchmarks.md takes it as is):
#   bash scripts/gpu_check.sh
# Each check reads ok, FAILED with its line, skipped (with why), not run, or cut by the budget (stopped early
# because the whole run's time was spent, not because it failed): the data, every test of
# tests/test_cuda.py (bf16 and fp16 training, fp16's GradScaler through forced non-finite steps on two ranks,
# compile, a real one-rank NCCL group under torchrun, DDP and FSDP with CUDA tensors as 2 processes sharing
# the GPU over gloo, a bit-exact resume, KV-cache sampling against the CPU, evaluation, export), then
# tokens/s, MFU and peak memory of the default and GPT-2-small configs in bf16, eager and compiled. NCCL
# between ranks needs a GPU per rank and is not covered on one GPU (the table's footer says what is not).
#
# Time budget on one H100/H200 with a cold compile cache (expected, then the step's timeout):
#   data      data/default prepared if missing (a few MB of text)                 10 s /  60 s
#   tests     tests/test_cuda.py: 14 tests, ~24 process starts x ~6 s (CUDA init)
#             + ~40 s of inductor for test_compile_on_gpu + a few s of training  190 s / 240 s
#   bench     default 32x512 bf16, eager: start + 3 + 10 steps                    20 s /  60 s
#   bench     default 32x512 bf16, compiled: + inductor, 6 blocks                 70 s / 100 s
#   plan      dev/plan_check.py: the planner's peak against max_memory_allocated,
#             default 16x512 bf16 and a tiny baseline, eager                       30 s /  60 s
#   bench     GPT-2 small 16x1024 bf16, eager                                     25 s /  60 s
#   bench     GPT-2 small 16x1024 bf16, compiled: + inductor, 12 blocks          100 s / 130 s
#   total                                                                        445 s
# The whole run stops at 470 s whatever happens: a step gets at most the time left (killed at that point it
# reads "cut by the budget") and one with none left reads "not run", so the script ends inside 8 minutes even
# if every step hangs. nanoGPT's side by side
# (python -m dev.vs_nanogpt --compiled) is outside this budget; run it on its own, and so is the 1-GPU
# record track's first minutes, with its tokens/s and MFU: bash dev/gpu_track.sh configs/enwik8_1gpu.yaml 180
#
# Without a CUDA device it says so and prints the table of skips (the tests collected and skipped), exit 0.
# Exit status: 1 when a check failed or timed out, else 0 (skipped, not run and cut by the budget are not failures).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
DEADLINE=$((SECONDS + 470))

step() {  # id, timeout in seconds, command...: output in $out/<id>.log,
          # "<exit code> <seconds> <limit> <its own timeout>" in $out/<id>.rc (limit < its own: cut to the time left)
    local id=$1 limit=$2 asked=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS
    shift 2
    if (( left < 10 )); then
        echo "not-run 0 $limit" > "$out/$id.rc"
        return
    fi
    (( limit > left )) && limit=$left
    echo "gpu_check: $id (at most $limit s)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$out/$id.log" 2>&1
    echo "$? $((SECONDS - t0)) $limit $asked" > "$out/$id.rc"
}

# -n 0: one process (pytest.ini asks for xdist workers), so the CUDA tests never share the GPU among workers
tests=("$PYTHON" -m pytest -v -n 0 -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml="$out/tests.xml")
if ! why=$("$PYTHON" -c 'import torch, sys
ok = torch.cuda.is_available()
print("" if ok else f"no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda})")
sys.exit(0 if ok else 1)'); then
    echo "gpu_check: skipped: $why"
    step tests 120 "${tests[@]}"
    "$PYTHON" -m scripts.gpu_check_report "$out" --skip "$why"
    exit 0
fi

step data 60 bash -c '[ -f data/default/train-00000.bin ] || "$0" -m data.prepare_dataset' "$PYTHON"
step tests 240 "${tests[@]}"
bench() {  # step id, timeout, then benchmark.py arguments
    local id=$1 limit=$2
    shift 2
    step "$id" "$limit" "$PYTHON" -m scripts.benchmark --device cuda --steps 10 --warmup 3 "$@"
}
D=(--config configs/default_config.yaml train.batch_size=32 train.precision=bf16)
G=(--config configs/gpt2_small.yaml train.precision=bf16)
bench bench_default 60 "${D[@]}"
bench bench_default_compiled 100 "${D[@]}" train.compile=true
step plan 60 "$PYTHON" -m dev.plan_check --device cuda --config configs/default_config.yaml train.batch_size=16 \
    train.precision=bf16
bench bench_gpt2 60 "${G[@]}" train.compile=false
bench bench_gpt2_compiled 130 "${G[@]}" train.compile=true
"$PYTHON" -m scripts.gpu_check_report "$out"

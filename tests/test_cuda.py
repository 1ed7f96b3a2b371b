"""The real entry points on a CUDA GPU: bf16 and fp16 training, compile, torchrun on NCCL, exact resume,
KV-cache sampling against the CPU, evaluation, export and the benchmark. Skipped, with the reason, where no
CUDA device is visible; scripts/gpu_check.sh runs them with the benchmark matrix on any GPU machine.

Exact resume on a GPU uses deterministic settings: fp32 with TF32 off (train.tf32=false), dropout 0,
CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS's reproducible workspace) and the same GPU for both runs.
"""

import json
import os

import pytest
import torch
import yaml

from conftest import child_env, load_weights, run_script, run_torchrun, tiny_overrides

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason=f"no CUDA device visible (torch {torch.__version__}, "
                                        f"CUDA build {torch.version.cuda}); run scripts/gpu_check.sh on a GPU machine")]

DETERMINISTIC = dict(train__precision="fp32", train__tf32="false", model__dropout=0.0)
# a model big enough for the GPU kernels (head size 32) yet seconds to train
GPU_MODEL = dict(model__dim=128, model__n_layers=2, model__n_heads=4, model__ffn_dim=512, model__context_length=64,
                 train__batch_size=8)


def gpu_env(**extra: str) -> dict:
    """The GPUs this process sees (the CPU suite's child_env hides them), cuBLAS reproducible."""
    return child_env(CUBLAS_WORKSPACE_CONFIG=":4096:8", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES"),
                     **extra)


def train(tiny_data, run, *args: str, **overrides):
    return run_script("train_single.py", "--device", "cuda", *args,
                      *tiny_overrides(tiny_data, run, **{**GPU_MODEL, **overrides}), env=gpu_env(), check=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_learns(tiny_data, tmp_path, precision):
    """bf16 autocast, and fp16 with its GradScaler (whose state is checkpointed), both lower the loss."""
    if precision == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("this GPU has no bf16")
    proc = train(tiny_data, tmp_path, train__precision=precision, train__max_steps=30, train__lr=3.0e-3,
                 train__eval_every=0, train__log_every=5)
    assert f"precision: {precision} (set in the config)" in proc.stdout
    losses = [float(line.split("| loss ")[1].split()[0]) for line in proc.stdout.splitlines() if "| loss " in line]
    assert losses[-1] < 0.8 * losses[0], losses
    state = torch.load(tmp_path / "ckpt/last_checkpoint.pt", map_location="cpu", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")  # the disabled scaler saves an empty state


def test_auto_precision_on_cuda_is_bf16_or_fp16(tiny_data, tmp_path):
    train(tiny_data, tmp_path, train__precision="auto", train__max_steps=2)
    saved = yaml.safe_load((tmp_path / "ckpt/config.yaml").read_text())["train"]["precision"]
    assert saved == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")


def test_compile_on_gpu(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, train__compile="true", train__precision="auto", train__max_steps=4)
    assert "torch.compile failed" not in proc.stdout, proc.stdout


def test_torchrun_one_rank_on_nccl(tiny_data, tmp_path):
    """distributed.backend=nccl named, one rank: a real NCCL group of one whose communicator an all-reduce made
    (with auto, one rank makes no group). NCCL between ranks needs a GPU per rank."""
    overrides = tiny_overrides(tiny_data, tmp_path, **GPU_MODEL, distributed__backend="nccl")
    proc = run_torchrun(1, "tests/helpers/instrumented_ddp.py", "--device", "cuda", *overrides,
                        env=gpu_env(RECORD_RANKS=str(tmp_path / "ranks")), check=True)
    assert "done: 6 steps" in proc.stdout
    assert json.loads((tmp_path / "ranks/rank0.json").read_text())["backend"] == "nccl"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_ranks_on_nccl_match_one_process(tiny_data, tmp_path):
    """2 ranks x batch 4 == 1 process x batch 8 (fp32, TF32 off), within float reordering of the all-reduce."""
    one = {**GPU_MODEL, **DETERMINISTIC}
    two = {**one, "train__batch_size": 4}
    run_torchrun(2, "train_ddp.py", "--device", "cuda", *tiny_overrides(tiny_data, tmp_path / "two", **two),
                 env=gpu_env(), check=True)
    train(tiny_data, tmp_path / "one", **DETERMINISTIC)
    a, b = load_weights(tmp_path / "one/ckpt/last_checkpoint.pt"), load_weights(tmp_path / "two/ckpt/last_checkpoint.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_on_one_gpu_over_gloo_match_one_process(tiny_data, tmp_path, strategy):
    """DDP and FSDP (its sharded checkpoint included) with CUDA tensors: 2 processes share this GPU and gloo
    carries the CUDA tensors; 2 x batch 4 == 1 process x batch 8. NCCL with more than one rank needs a GPU
    per rank (test_two_ranks_on_nccl_match_one_process): on one GPU it is not covered."""
    one = {**GPU_MODEL, **DETERMINISTIC}
    two = {**one, "train__batch_size": 4, "distributed__backend": "gloo", "distributed__strategy": strategy}
    run_torchrun(2, "train_ddp.py", "--device", "cuda:0", *tiny_overrides(tiny_data, tmp_path / "two", **two),
                 env=gpu_env(), check=True)
    train(tiny_data, tmp_path / "one", **DETERMINISTIC)
    a = load_weights(tmp_path / "one/ckpt/last_checkpoint.pt")
    if strategy == "fsdp":
        run_script("-m", "scripts.convert_checkpoint", "--checkpoint", tmp_path / "two/ckpt/step_0000006",
                   "--out", tmp_path / "two.pt", env=gpu_env(), check=True)
        b = load_weights(tmp_path / "two.pt")
    else:
        b = load_weights(tmp_path / "two/ckpt/last_checkpoint.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_fp16_scaler_through_a_forced_non_finite_step(tiny_data, tmp_path):
    """fp16 + GradScaler on the GPU, 2 processes (gloo, one GPU), rank 1's loss NaN at steps 2 and 3: both
    ranks skip those steps with one scale, halve it, and finish (tests/test_fp16.py on the CPU)."""
    overrides = tiny_overrides(tiny_data, tmp_path, **GPU_MODEL, train__precision="fp16", train__eval_every=0,
                               distributed__backend="gloo")
    run_torchrun(2, "tests/helpers/poison_rank.py", "--device", "cuda:0", *overrides, check=True,
                 env=gpu_env(POISON_RANK="1", POISON_STEPS="2,3", RECORD_SCALE=str(tmp_path / "scale")))
    ranks = [[json.loads(line) for line in (tmp_path / "scale" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 6
    assert [r["applied"] for r in ranks[0][2:4]] == [False, False] and ranks[0][3]["scale"] < ranks[0][1]["scale"]


def test_exact_resume_on_gpu(tiny_data, tmp_path):
    """8 steps == 4 + --resume auto to 8, weights bit for bit, under the deterministic settings above."""
    settings = dict(train__max_steps=8, train__save_every=4, train__eval_every=4, **DETERMINISTIC)
    train(tiny_data, tmp_path / "full", **settings)
    train(tiny_data, tmp_path / "split", train__stop_at_step=4, **settings)
    train(tiny_data, tmp_path / "split", "--resume", "auto", **settings)
    a = load_weights(tmp_path / "full/ckpt/step_0000008.pt")
    b = load_weights(tmp_path / "split/ckpt/step_0000008.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


@torch.no_grad()
def test_kv_cache_logits_on_gpu_match_cpu():
    """Prefill + one-token decode steps on the GPU against a full CPU forward, fp32 with TF32 off:
    relative error <= 1e-4 (of the largest logit); bf16 weights on the GPU: <= 5e-2."""
    from models.config import ModelConfig
    from models.transformer import GPT

    torch.manual_seed(0)
    cpu = GPT(ModelConfig(dim=128, n_layers=2, n_heads=4, ffn_dim=512, context_length=64)).eval()
    idx = torch.randint(0, 256, (2, 48))
    reference = cpu(idx)[0]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            gpu = GPT(cpu.cfg)
            gpu.load_state_dict(cpu.state_dict())
            gpu = gpu.to("cuda", dtype).eval()
            x = idx.cuda()
            gpu._set_cache(2, dtype)
            try:
                steps = [gpu(x[:, :32], pos=0)[0]] + [gpu(x[:, t:t + 1], pos=t)[0] for t in range(32, 48)]
            finally:
                gpu._set_cache(0, None)
            logits = torch.cat(steps, dim=1).float().cpu()
            error = ((logits - reference).abs().max() / reference.abs().max()).item()
            assert error <= tol, (dtype, error)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory):
    from conftest import make_dataset

    tmp = tmp_path_factory.mktemp("gpu")
    data = make_dataset(tmp / "data")
    run_script("train_single.py", "--device", "cuda",
               *tiny_overrides(data, tmp, **GPU_MODEL, train__precision="auto", train__max_steps=10),
               env=gpu_env(), check=True)
    return tmp / "ckpt/best_model.pt"


def test_sampling_and_evaluation_on_gpu(gpu_checkpoint, tmp_path):
    sample = run_script("inference.py", "--checkpoint", gpu_checkpoint, "--device", "cuda", "--prompt", "the",
                        "--max-new-tokens", "40", "--seed", "1", env=gpu_env(), check=True)
    assert "cuda" in sample.stderr and len(sample.stdout) > 3
    for device in ("cuda", "cpu"):
        run_script("-m", "scripts.evaluate", "--checkpoint", gpu_checkpoint, "--device", device, "--precision", "fp32",
                   "--json", tmp_path / f"{device}.json", env=gpu_env(), check=True)
    gpu, cpu = (json.loads((tmp_path / f"{d}.json").read_text()) for d in ("cuda", "cpu"))
    assert gpu["bytes"] == cpu["bytes"] and gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)  # TF32 on the GPU


def test_export_checks_logits_on_gpu(gpu_checkpoint, tmp_path):
    pytest.importorskip("transformers")
    run_script("-m", "scripts.export_hf", "--checkpoint", gpu_checkpoint, "--out", tmp_path / "hf", "--device", "cuda",
               env=gpu_env(), check=True)
    assert (tmp_path / "hf/model.safetensors").is_file()


def test_benchmark_reports_memory_and_mfu(tiny_data, tmp_path):
    proc = run_script("-m", "scripts.benchmark", "--device", "cuda", "--steps", "3", "--warmup", "1",
                      *tiny_overrides(tiny_data, tmp_path, **GPU_MODEL, train__precision="auto"),
                      env=gpu_env(), check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["peak_memory_mib"] > 0 and result["tokens_per_sec"] > 0
    assert result["mfu"] is None or 0 < result["mfu"] < 1

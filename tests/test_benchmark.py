"""The benchmark script, the MFU arithmetic, and that every speed lever keeps the math."""

import json

import pytest
import torch

from conftest import run_script, run_torchrun, tiny_overrides
from models.config import ModelConfig
from models.config_loader import load_config
from models.transformer import GPT
from scripts.benchmark import main as benchmark_main, print_result
from utils.distributed.process_group import DistInfo
from utils.metrics.flops import flops_per_token, gpu_peak_flops, gpu_peak_key, model_flops_utilization
from utils.metrics.logger import MetricsLogger
from utils.train.optim import build_optimizer
from utils.train.run import agree_precision, build_trainer, load_data, resolved
from utils.train.trainer import Trainer

CPU = DistInfo(0, 0, 1, torch.device("cpu"), None)
FIELDS = {"device", "torch", "threads", "precision", "compile", "fused_adamw", "activation_checkpointing", "params",
          "batch_size", "context_length", "tokens_per_step", "steps", "warmup", "ms_per_step", "ms_per_step_mean",
          "tokens_per_sec", "flops_per_token", "flops_basis", "achieved_tflops", "peak_flops", "peak_source", "mfu", "peak_memory_mib", "strategy", "state_mib",
          "loadavg_1m", "date"}


def built(data_dir, tmp_path, **overrides) -> Trainer:
    cfg = load_config(None, tiny_overrides(data_dir, tmp_path, **overrides))
    precision = agree_precision(cfg, CPU, None)
    cfg = resolved(cfg, precision, steps_per_epoch=0)
    plan, val_data = load_data(cfg, CPU)
    return build_trainer(cfg, precision, CPU, plan, val_data, MetricsLogger(tmp_path, is_main=False))


@pytest.mark.slow
def test_benchmark_reports_every_field(tiny_data, tmp_path):
    """A smoke-sized CPU run prints the table and a JSON line whose fields agree with each other."""
    proc = run_script("-m", "scripts.benchmark", "--device", "cpu", "--steps", "3", "--warmup", "1",
                      *tiny_overrides(tiny_data, tmp_path, train__precision="bf16"), check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == FIELDS
    assert "tokens_per_sec" in proc.stdout and "peak_memory_mib" in proc.stdout
    assert result["torch"] == torch.__version__ and result["precision"] == "bf16" and result["compile"] == "off"
    assert result["params"] == GPT(load_config(None, tiny_overrides(tiny_data, tmp_path)).model).num_params()
    assert result["tokens_per_step"] == 4 * 32 and result["steps"] == 3 and result["threads"] >= 1
    assert result["tokens_per_sec"] == pytest.approx(128 / result["ms_per_step"] * 1e3, rel=1e-2)  # both rounded
    assert 0 < result["mfu"] < 1 and result["peak_flops"] > 1e9 and "measured CPU" in result["peak_source"]
    assert result["mfu"] == pytest.approx(result["tokens_per_sec"] * result["flops_per_token"] / result["peak_flops"],
                                          rel=1e-3)
    assert 50 < result["peak_memory_mib"] < 4096 and "6N + 12*L*d*T" in result["flops_basis"]
    assert result["achieved_tflops"] == pytest.approx(result["mfu"] * result["peak_flops"] / 1e12, rel=1e-2, abs=1e-4)


def test_benchmark_bad_input_is_one_line(capsys, tiny_data, tmp_path):
    """Bad flags or data give one `error:` line and exit 2, with no traceback (in-process; test_boundary.py runs
    the script's usage error as a process)."""
    for args in (["--steps", "0"], ["data.dir=" + str(tmp_path / "missing")]):
        assert benchmark_main(["--device", "cpu", *tiny_overrides(tiny_data, tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_mfu_matches_hand_computation():
    """The seed model's FLOPs per token and an A100 bf16 MFU equal the numbers worked out by hand."""
    # per block: qkv 256*768+768, proj 256*256+256, fc 256*1024+1024, proj 1024*256+256, 2 LayerNorms 2*512
    per_block = 197_376 + 65_792 + 263_168 + 262_400 + 1_024
    n = 6 * per_block + 256 * 256 + 512  # + tied token embedding (it is the LM head) + final norm
    assert GPT(ModelConfig()).num_params(non_embedding=True) == n == 4_804_608
    fpt = flops_per_token(n, n_layers=6, dim=256, context_length=512)
    assert fpt == 6 * 4_804_608 + 12 * 6 * 256 * 512 == 38_264_832
    peak, source = gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16", tf32=True)
    assert peak == 312e12 and "A100" in source
    assert model_flops_utilization(100_000, fpt, peak) == pytest.approx(100_000 * 38_264_832 / 312e12)
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32", tf32=True)[0] == 494.5e12  # TF32 tensor cores


@pytest.mark.parametrize("name, key, bf16", [
    ("NVIDIA H200", "H200 SXM", 989e12), ("NVIDIA H200 NVL", "H200 NVL", 835.5e12),
    ("NVIDIA GH200 480GB", "GH200", 989e12), ("NVIDIA H800", "H800 SXM", 989e12),
    ("NVIDIA H800 PCIe", "H800 PCIe", 756e12), ("NVIDIA L40S", "L40S", 362.05e12), ("NVIDIA L4", "L4", 121e12),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12), ("NVIDIA A10G", "A10G", 70e12)])
def test_gpu_names_find_their_own_datasheet_row(name, key, bf16):
    """Each name maps to its own row, never a neighbour's (H200 NVL is not the SXM part, L40S is not L4)."""
    assert gpu_peak_key(name) == key and gpu_peak_flops(name, "bf16", tf32=True)[0] == bf16


@pytest.mark.parametrize("name", ["Tesla T4", "NVIDIA L40", "NVIDIA GeForce RTX 3090"])
def test_unknown_gpu_reports_no_mfu(name, capsys):
    """A GPU missing from the table gets no peak and MFU "n/a", never a neighbour's number."""
    assert gpu_peak_key(name) is None
    peak, source = gpu_peak_flops(name, "bf16", tf32=True)
    assert peak is None and name in source and "not reported" in source
    assert model_flops_utilization(50_000, 1e8, peak) is None
    print_result({"device": name, "mfu": None})
    assert "n/a" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.slow
def test_compiled_step_matches_eager(tiny_data, tmp_path):
    """torch.compile gives the eager losses and weights on CPU (fp32, two steps), from the two graphs compiled
    at build time, training's and evaluation's (the real steps compile nothing more)."""
    from torch._dynamo.utils import counters

    eager = built(tiny_data, tmp_path / "e", model__n_layers=1)
    counters.clear()
    compiled = built(tiny_data, tmp_path / "c", model__n_layers=1, train__compile="true")
    assert hasattr(compiled.model, "_orig_mod"), "compilation fell back to eager; nothing was compared"
    for _ in range(2):
        assert compiled.train_step()[0] == pytest.approx(eager.train_step()[0], rel=1e-5)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    for (name, a), b in zip(eager.raw.named_parameters(), compiled.raw.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_a_failing_compile_trains_eagerly(tiny_data, tmp_path, monkeypatch):
    """A compiler that fails on the first batch leaves one warning line and an eager model that trains."""
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ toolchain")

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend=broken))
    torch._dynamo.reset()
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, model__n_layers=1, train__compile="true"))
    precision = agree_precision(cfg, CPU, None)
    cfg = resolved(cfg, precision, steps_per_epoch=0)
    plan, val_data = load_data(cfg, CPU)
    logger = MetricsLogger(tmp_path / "logs", is_main=True)
    trainer = build_trainer(cfg, precision, CPU, plan, val_data, logger)
    logger.close()
    assert not hasattr(trainer.model, "_orig_mod")
    assert "warning: torch.compile failed (BackendCompilerFailed" in logger.path.read_text()
    assert all(trainer.train_step()[2] for _ in range(2))


def test_compiled_as_names_whole_per_block_and_eager():
    """The benchmark's compile column: torch.compile's wrapper, FSDP's per-block Module.compile, or eager."""
    from utils.distributed.parallel import compiled_as

    model = GPT(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, context_length=16))
    assert compiled_as(model) is None and compiled_as(torch.compile(model)) == "whole"
    for block in model.blocks:
        block.compile()  # lazy: nothing is compiled until a forward
    assert compiled_as(model) == "per block"


def test_fused_adamw_matches_foreach_on_cpu():
    """The fused CPU AdamW kernel takes the same steps as the default implementation."""
    cfg = load_config(None, ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64",
                             "model.context_length=16"])
    models, optimizers = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        models.append(GPT(cfg.model))
        tcfg = load_config(None, [f"optim.fused={str(fused).lower()}", "optim.lr=1.0e-2"]).optim
        optimizers.append(build_optimizer(models[-1], tcfg, torch.device("cpu")))
    assert [bool(o.defaults["fused"]) for o in optimizers] == [False, True]
    for step in range(5):
        # the same gradients for both, so only the optimizers can differ (Adam amplifies any drift in them)
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g) * 10.0 ** -step for p in models[0].parameters()]
        for model, opt in zip(models, optimizers):
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_fast_cpu_setting_still_learns(tiny_data, tmp_path):
    """bf16 autocast with fused AdamW (the CPU speed setting) lowers the loss on a tiny corpus."""
    trainer = built(tiny_data, tmp_path, train__precision="bf16", train__fused_adamw="true", train__max_steps=40,
                    train__lr=3e-3, train__warmup_steps=5)
    assert trainer.optimizer.defaults["fused"]
    losses = [trainer.train_step()[0] for _ in range(40)]
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0, losses[::5]


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing each block in backward changes memory, not the gradients."""
    cfg = load_config(None, ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64",
                             "model.context_length=16"])
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    x = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        model(x[:, :-1], x[:, 1:])[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 3  # once without checkpointing; forward plus recomputation with it
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-7), name


@pytest.mark.slow
def test_benchmark_under_torchrun_reports_totals_and_scaling(tiny_data, tmp_path):
    """Two gloo ranks: per-process and total tokens/s, and efficiency against the given one-process figure."""
    proc = run_torchrun(2, "-m", "scripts.benchmark", "--device", "cpu", "--steps", "2", "--warmup", "1",
                        "--baseline-tokens-per-sec", "1000", *tiny_overrides(tiny_data, tmp_path), check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["tokens_per_step"] == 4 * 32
    assert result["total_tokens_per_sec"] == pytest.approx(2 * result["tokens_per_sec"], rel=1e-3)
    assert result["scaling_efficiency"] == pytest.approx(result["tokens_per_sec"] / 1000, rel=1e-3)
    assert result["total_vs_baseline"] == pytest.approx(result["total_tokens_per_sec"] / 1000, rel=1e-3)

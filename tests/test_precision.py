"""train.precision=auto: measured once per host and cached, recorded as resolved, kept on resume and sampling;
the autocast/GradScaler choice; CPU attention in fp32 inside a bf16 run."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import child_env, run_script, tiny_overrides
from models.config import ModelConfig
from models.config_checks import ConfigError
from models.config_loader import load_config
from models.transformer import attention
from utils.checkpoint.format import CONFIG
from utils.distributed.process_group import DistInfo
from utils.precision import BF16_MARGIN, autocast_context, grad_scaler, resolve_precision
from utils.train.run import agree_precision

TINY = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, context_length=16)
CPU = DistInfo(0, 0, 1, torch.device("cpu"), None)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder on what reads as a quiet machine (figures taken under load are not stored)."""
    monkeypatch.setenv("BYTEGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    return tmp_path / "cache" / "precision.json"


def test_explicit_settings_and_resumed_runs_are_kept(cache):
    cpu = torch.device("cpu")
    assert resolve_precision("fp16", cpu, TINY, 4).name == "fp16"
    assert resolve_precision("auto", cpu, TINY, 4, trained_with="bf16").name == "bf16"
    assert not cache.exists()  # neither measures


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_cuda_auto_follows_the_gpus_compute_capability(monkeypatch, capability, expected):
    """bf16 from Ampere (8.0) on, asked of the GPU in use; fp16 with a GradScaler before (V100, T4), where
    torch.cuda.is_bf16_supported() says yes for slow emulated bf16."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    gpu = torch.device("cuda", 3)
    assert resolve_precision("auto", gpu, TINY, 4).name == expected and asked == [gpu]


def test_fsdp_refuses_fp16_that_auto_resolved(cache):
    """auto resolved to fp16 (here: resuming an fp16 run) under FSDP: one ConfigError that names auto's reason."""
    cfg = load_config(None, ["train.precision=auto", "distributed.strategy=fsdp"])
    with pytest.raises(ConfigError, match=r"train.precision=auto resolved to fp16 \(auto: as the checkpoint"):
        agree_precision(cfg, CPU, {CONFIG: {"train": {"precision": "fp16"}}})


def test_cpu_auto_measures_once_caches_and_decides_by_the_measurement(cache):
    first = resolve_precision("auto", torch.device("cpu"), TINY, 4)
    assert "measured now" in first.reason and cache.exists()
    (entry,) = json.loads(cache.read_text()).values()
    assert first.name == entry["precision"] == ("bf16" if entry["bf16_speedup"] > 1 / BF16_MARGIN else "fp32")
    assert entry["fp32_ms"] > 0 and entry["bf16_ms"] > 0
    second = resolve_precision("auto", torch.device("cpu"), TINY, 4)
    assert second.name == first.name and "cached in" in second.reason
    resolve_precision("auto", torch.device("cpu"), TINY, 8)  # other shapes: another entry
    assert len(json.loads(cache.read_text())) == 2


def test_a_corrupt_cache_is_measured_around(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert "measured now" in resolve_precision("auto", torch.device("cpu"), TINY, 4).reason
    assert len(json.loads(cache.read_text())) == 1


def test_a_figure_measured_on_a_busy_machine_is_not_kept(cache, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0 * os.cpu_count() + 1, 0.0, 0.0))
    assert "so not cached" in resolve_precision("auto", torch.device("cpu"), TINY, 4).reason
    assert not cache.exists()


def test_autocast_and_scaler_follow_the_precision():
    cpu = torch.device("cpu")
    assert not grad_scaler(cpu, "bf16").is_enabled() and grad_scaler(cpu, "fp16").is_enabled()
    with autocast_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_cpu_attention_runs_fp32_inside_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with autocast_context(torch.device("cpu"), "bf16"):
        y = attention(q, k, v, is_causal=True, dropout_p=0.0)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, atol=1e-2, rtol=1e-2)  # one bf16 rounding of the output
    y.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16


@pytest.mark.slow
def test_auto_is_recorded_resolved_and_kept_by_resume_and_sampling(tiny_data, tmp_path):
    env = child_env(BYTEGPT_CACHE_DIR=str(tmp_path / "cache"))
    args = ["train_single.py", "--device", "cpu", *tiny_overrides(tiny_data, tmp_path, train__precision="auto", train__max_steps=4,
                                               train__stop_at_step=2, train__eval_every=0, train__save_every=2)]
    first = run_script(*args, env=env, check=True)
    saved = yaml.safe_load((tmp_path / "ckpt/config.yaml").read_text())["train"]["precision"]
    assert saved in ("fp32", "bf16") and f"precision: {saved} (auto: bf16 matmuls ran" in first.stdout
    state = torch.load(tmp_path / "ckpt/step_0000002.pt", map_location="cpu", weights_only=True)
    assert state["config"]["train"]["precision"] == saved
    resumed = run_script(*args, "--resume", "auto", env=env, check=True)
    assert f"precision: {saved} (auto: as the checkpoint being resumed was trained" in resumed.stdout
    sample = run_script("inference.py", "--checkpoint", tmp_path / "ckpt/best_model.pt", "--device", "cpu",
                        "--prompt", "a", "--max-new-tokens", "4", env=env, check=True)
    assert f"cpu {saved}]" in sample.stderr

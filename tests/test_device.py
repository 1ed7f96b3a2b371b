"""--device: auto picks CUDA, then MPS, then the CPU; a bad or absent device is one error line in every entry point."""

import pytest
import torch

from conftest import run_script
from utils.errors import UserError
from utils.device import fused_adamw, mps_available, pin_memory, resolve_device


def test_auto_and_none_take_the_best_device_present():
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_says_how_to_fix_it():
    with pytest.raises(UserError, match="no CUDA GPU is visible.*--device cpu"):
        resolve_device("cuda:0")


@pytest.mark.skipif(mps_available(), reason="needs a machine without MPS")
def test_mps_without_apple_gpu_is_refused():
    with pytest.raises(UserError, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("arg", ["banana", "xla", "cuda:x"])
def test_unknown_devices_list_the_choices(arg):
    with pytest.raises(UserError, match="auto, cpu, cuda, cuda:N or mps"):
        resolve_device(arg)


def test_per_device_choices():
    cpu = torch.device("cpu")
    assert not pin_memory(cpu) and pin_memory(torch.device("cuda", 0))
    assert fused_adamw(cpu) and fused_adamw(torch.device("cuda", 0)) and not fused_adamw(torch.device("mps"))


@pytest.mark.parametrize("script", ["train_single.py", "inference.py", "-m scripts.evaluate", "-m scripts.export_hf",
                                    "-m scripts.benchmark"])
def test_every_entry_point_takes_device_and_refuses_a_bad_one(script, tmp_path):
    extra = {"-m scripts.export_hf": ["--out", str(tmp_path / "hf")], "inference.py": ["--prompt", "a"]}.get(script, [])
    proc = run_script(*script.split(), "--device", "banana", *extra, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "auto, cpu, cuda, cuda:N or mps" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_skips_cleanly_without_a_gpu():
    import subprocess

    from conftest import ROOT, child_env

    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu_check: skipped: no CUDA device visible"), proc.stdout

"""--device: auto picks CUDA, then MPS, then the CPU; a bad or absent device is one error line in every entry point."""

import pytest
import torch

from conftest import run_here, run_script
from utils.errors import UserError
from utils.device import check_gpu_per_rank, fused_adamw, mps_available, pin_memory, resolve_device
from utils.distributed.rendezvous import env_ranks


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


@pytest.fixture
def gpus(monkeypatch):
    """A machine that shows n GPUs to this process (set gpus.count); records set_device calls."""
    class Gpus:
        count = 1
        current: list = []

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Gpus.count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: Gpus.current.append(device))
    return Gpus


@pytest.mark.parametrize("env, visible, arg, expected", [
    # plain srun, --gpus-per-task=1: each task sees one GPU whatever its SLURM_LOCALID
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, 1, None, 0),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, 1, "cuda", 0),
    # srun or torchrun where every process sees the node's GPUs
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}, 4, None, 3),
    ({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}, 4, "cuda", 1),
    # one process on the third GPU (train_single.py --device cuda:2)
    ({}, 4, "cuda:2", 2),
])
def test_cuda_device_follows_the_launcher_and_becomes_current(gpus, env, visible, arg, expected):
    """The GPU index from the launcher's variables and what the process sees, and it is made the current
    device (so a checkpoint's CUDA RNG state is that GPU's)."""
    gpus.count = visible
    _, local_rank, _ = env_ranks(env)
    device = resolve_device(arg, local_rank)
    assert device == torch.device("cuda", expected) and gpus.current == [device]


def test_more_processes_than_gpus_is_refused(gpus):
    gpus.count = 2
    _, local_rank, _ = env_ranks({"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4"})
    with pytest.raises(UserError, match="local rank 2 has no GPU of its own: this process sees 2 GPUs"):
        resolve_device(None, local_rank)
    with pytest.raises(UserError, match="cuda:2 requested but only 2 GPU"):
        resolve_device("cuda:2")


def test_several_nccl_ranks_on_one_visible_gpu_are_refused(gpus, monkeypatch):
    """torchrun --nproc_per_node=2 where one GPU is visible: under NCCL every worker would take cuda:0 and end in
    NCCL's raw "Duplicate GPU detected"; the repo's own line says what to start instead. gloo may share it."""
    gpus.count = 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    gpu = torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"torchrun started 2 processes on this node, but they see one GPU.*"
                                        r"--nproc_per_node=1"):
        check_gpu_per_rank("nccl", gpu)
    check_gpu_per_rank("gloo", gpu)  # gpu_check's 2 processes on one GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # srun --gpus-per-task=1: each task its own GPU
    check_gpu_per_rank("nccl", gpu)


def test_per_device_choices():
    cpu = torch.device("cpu")
    assert not pin_memory(cpu) and pin_memory(torch.device("cuda", 0))
    assert fused_adamw(cpu) and fused_adamw(torch.device("cuda", 0)) and not fused_adamw(torch.device("mps"))


@pytest.mark.parametrize("script", ["train_single.py", "inference.py", "-m scripts.evaluate", "-m scripts.export_hf",
                                    "-m scripts.benchmark"])
def test_every_entry_point_takes_device_and_refuses_a_bad_one(script, tmp_path, capfd):
    extra = {"-m scripts.export_hf": ["--out", str(tmp_path / "hf")], "inference.py": ["--prompt", "a"]}.get(script, [])
    args = [*script.split(), "--device", "banana", *extra]  # the first as a process, the rest in this one
    proc = run_script(*args, timeout=120) if script == "train_single.py" else run_here(capfd, *args)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "auto, cpu, cuda, cuda:N or mps" in err, err

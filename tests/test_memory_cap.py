"""FSDP trains a model whose training state does not fit in one process's memory: each rank runs in a
memory cgroup of its own (tests/helpers/capped.py), capped as a GPU would be, and the kernel kills a
process that goes past it. Needs root and a writable memory cgroup (v1 or v2); skipped otherwise."""

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import child_env, run_script, run_torchrun, tiny_overrides

HELPER = "tests/helpers/capped.py"
# 25.4M parameters: weights, gradients and AdamW state 387 MiB whole, 97 MiB per rank on 4 ranks. The smallest
# cap each run lived under, measured (cgroup v1, MALLOC_MMAP_THRESHOLD_ as below): one process 650 MiB (killed
# at 600), FSDP on 4 ranks 390 MiB (killed at 360); the process itself (Python, torch, gloo) is most of that.
MODEL = dict(model__dim=512, model__n_layers=8, model__n_heads=8, model__ffn_dim=2048, model__context_length=32)
CAP_MIB = 500


def memory_cgroup_parent() -> tuple[Path, str, str] | None:
    """Where capped child groups can be made: (folder, limit file, memory + swap limit file)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1: under this process's own group
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes", \
                "memory.memsw.limit_in_bytes"
    control = Path("/sys/fs/cgroup/cgroup.subtree_control")  # v2: under the root, if it hands out memory
    if control.exists() and "memory" in control.read_text().split():
        return control.parent, "memory.max", "memory.swap.max"
    return None


@pytest.fixture
def capped_groups():
    """make(name, ranks): `ranks` cgroups side by side, capped at CAP_MIB each with no swap, and the prefix that
    tests/helpers/capped.py completes with a rank; all removed after the test, any process left in them killed."""
    found = memory_cgroup_parent()
    if found is None or os.geteuid() != 0:
        pytest.skip("needs root and a memory cgroup to make capped child groups in")
    parent, limit, swap = found
    made: list[Path] = []

    def make(name: str, ranks: int) -> str:
        prefix = parent / f"bytegpt-test-{os.getpid()}-{name}-rank"
        for rank in range(ranks):
            group = Path(f"{prefix}{rank}")
            try:
                group.mkdir()
            except OSError as e:
                pytest.skip(f"cannot make a memory cgroup in {parent}: {e}")
            made.append(group)
            (group / limit).write_text(str(CAP_MIB * 2 ** 20))
            if (group / swap).exists():  # v1's file counts memory + swap, so the same figure means no swap
                (group / swap).write_text("0" if swap == "memory.swap.max" else str(CAP_MIB * 2 ** 20))
        return str(prefix)

    yield make
    for group in made:
        for _ in range(50):
            pids = (group / "cgroup.procs").read_text().split()
            if not pids:
                break
            for pid in pids:  # only the test's own children were ever moved here
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)
        group.rmdir()


@pytest.mark.slow
def test_fsdp_trains_a_model_that_one_process_cannot_hold(tiny_data, tmp_path, capped_groups):
    """Under the same per-process cap, FSDP on 4 gloo ranks trains 2 steps and saves, while one process is
    killed for memory (DDP holds what one process holds, and its gradient buckets besides)."""
    run = dict(**MODEL, train__batch_size=1, train__max_steps=2, train__eval_every=0, train__sample_tokens=0)
    env = dict(MALLOC_MMAP_THRESHOLD_="131072")  # freed tensors go back to the system (docs/benchmarks.md)
    fsdp = run_torchrun(4, HELPER, "--device", "cpu",
                        *tiny_overrides(tiny_data, tmp_path / "fsdp", distributed__strategy="fsdp", **run),
                        env=child_env(MEMORY_CGROUPS=capped_groups("fsdp", 4), **env), timeout=120)
    assert fsdp.returncode == 0, fsdp.stdout[-2000:] + fsdp.stderr[-2000:]
    assert (tmp_path / "fsdp/ckpt/step_0000002").is_dir()
    one = run_script(HELPER, "--device", "cpu", *tiny_overrides(tiny_data, tmp_path / "one", **run),
                     env=child_env(MEMORY_CGROUPS=capped_groups("one", 1), **env), timeout=120)
    assert one.returncode == -signal.SIGKILL, one.stdout[-2000:] + one.stderr[-2000:]

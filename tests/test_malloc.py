"""FSDP on several CPU ranks has glibc return large freed blocks to the system (utils/malloc.py), unless the
user fixed glibc's threshold; without glibc's mallopt nothing changes."""

import ctypes

import pytest

from conftest import child_env, finish, run_script, start, tiny_overrides, torchrun_cmd
from utils import malloc

HELPER = "tests/helpers/malloc_probe.py"


def has_mallinfo2() -> bool:
    """glibc 2.33 or newer, whose mallinfo2 the probe reads."""
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except (OSError, TypeError):
        return False


def no_handle(name: None) -> None:
    raise TypeError("LoadLibrary() argument 1 must be str, not None")  # CPython's CDLL(None) on Windows


@pytest.mark.slow
@pytest.mark.skipif(not has_mallinfo2(), reason="glibc 2.33 or newer")
def test_fsdp_ranks_return_freed_memory_unless_the_user_set_the_threshold(tiny_data, tmp_path):
    """After a real FSDP run on 2 ranks, on each rank a 1 MiB block allocated after a 16 MiB free is still a
    mapping of its own (glibc's default serves it from its heap); with the user's MALLOC_MMAP_THRESHOLD_ of
    32 MiB the heap serves it, as the user asked."""
    run = dict(distributed__strategy="fsdp", train__max_steps=1, train__eval_every=0, train__sample_tokens=0)
    fsdp = start(torchrun_cmd(2, HELPER, "--device", "cpu", *tiny_overrides(tiny_data, tmp_path, **run)),
                 env=child_env(MALLOC_MMAP_THRESHOLD_=None))
    user = run_script(HELPER, "--setting-only", env=child_env(MALLOC_MMAP_THRESHOLD_=str(32 << 20)), check=True)
    assert user.stdout.splitlines()[-1] == "heap"
    done = finish(fsdp, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(line for line in done.stdout.splitlines() if line in ("mapped", "heap")) == ["mapped", "mapped"]


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_a_threshold_the_user_chose_is_kept(monkeypatch, env):
    """glibc read the user's threshold at start; it is not replaced."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: pytest.fail("the C library was asked"))
    assert malloc.return_freed_memory() is False


@pytest.mark.parametrize("cdll", [lambda name: object(), no_handle], ids=["no mallopt (macOS)", "Windows"])
def test_nothing_happens_without_glibcs_mallopt(monkeypatch, cdll):
    """Another C library, or none to open: no setting and no error."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert malloc.return_freed_memory() is False

"""Nothing is written until every rank has checked everything, with real 2-rank runs: a rank whose own
data is damaged, an FSDP start asked to resume a single file, a rank that never joins, and a backend
that cannot run on the device. Each start is refused on every rank, and the checkpoint and log folders
stay exactly as they were."""

from __future__ import annotations

import os
import shutil
import sys
import time
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import train_single
from conftest import child_env, finish, make_dataset, run_torchrun, start, tiny_overrides
from test_distributed import free_port
from utils.distributed.rendezvous import env_ranks, master_address
from utils.errors import UserError

HELPER = "tests/helpers/instrumented_ddp.py"  # RANK1_OVERRIDES: overrides of rank 1's own


def damage(data_dir, how: str) -> None:
    shard = sorted(data_dir.glob("train-*.bin"))[0]
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif how == "missing shard":
        shard.unlink()
    else:  # a manifest edited by hand: the val split gone
        manifest = data_dir / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"val":', '"vall":'))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated shard", "missing shard", "edited manifest"])
def test_a_rank_whose_own_data_is_damaged_stops_every_rank_before_any_write(tiny_data, tmp_path, how):
    """Rank 1 reads its own copy of the dataset (a node-local disk), damaged; rank 0's is sound."""
    local = tmp_path / "rank1_data"
    shutil.copytree(tiny_data, local)
    damage(local, how)
    if how == "edited manifest":  # the ranks' manifests differ: caught by the agreement check, also before writing
        expected = "the ranks disagree"
    else:
        expected = "rank 1 refused the start"
    proc = run_torchrun(2, HELPER, "--device", "cpu", *tiny_overrides(tiny_data, tmp_path), timeout=240,
                        env=child_env(RANK1_OVERRIDES=f"data.dir={local}"))
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_an_fsdp_start_asked_to_resume_a_single_file_writes_nothing(tiny_data, tmp_path, capsys):
    assert train_single.main(tiny_overrides(tiny_data, tmp_path / "one", train__max_steps=3)) == 0
    step_file = tmp_path / "one/ckpt/step_0000003.pt"
    proc = run_torchrun(2, "train_ddp.py", "--device", "cpu", "--resume", step_file, "distributed.strategy=fsdp",
                        *tiny_overrides(tiny_data, tmp_path / "two"), timeout=240)
    assert proc.returncode != 0 and "is a single-file checkpoint" in proc.stderr, proc.stderr
    assert not (tmp_path / "two").exists()


@pytest.mark.slow
@pytest.mark.parametrize("refused", [0, 1])
def test_a_rank_that_never_joins_stops_the_others_within_the_join_timeout(tiny_data, tmp_path, refused):
    """Plain processes (as srun starts them): one rank's own config is refused before it joins; the
    other waits distributed.join_timeout_s, then stops with one line saying what it saw."""
    base = {k: v for k, v in child_env().items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    args = [sys.executable, "train_ddp.py", "--device", "cpu", *tiny_overrides(tiny_data, tmp_path),
            "distributed.join_timeout_s=3"]
    procs = [start(args + (["train.max_steps=-1"] if r == refused else []), dict(base, RANK=str(r),
                                                                                  LOCAL_RANK=str(r)))
             for r in (0, 1)]
    t0 = time.monotonic()
    bad, waiting = finish(procs[refused], 60), finish(procs[1 - refused], 60)
    assert time.monotonic() - t0 < 45  # the join timeout, not the 600 s collective timeout
    assert bad.returncode == 2 and "train.max_steps" in bad.stderr
    line = waiting.stderr.strip()
    assert waiting.returncode == 2 and "\n" not in line and "Traceback" not in line, line
    assert ("only 1 of 2 ranks joined within 3 s" if refused else "rank 0's store") in line, line
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def test_nccl_on_a_cpu_is_refused_before_the_process_group(tiny_data, tmp_path):
    env = dict(child_env(), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = finish(start([sys.executable, "train_ddp.py", "--device", "cpu", "distributed.backend=nccl",
                         *tiny_overrides(make_dataset(tmp_path / "d"), tmp_path)], env), 60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: distributed.backend=nccl runs on CUDA devices only, and this rank runs on cpu; use "
        "distributed.backend=gloo (or auto)")


LAUNCH_VARS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "MASTER_PORT"]


@settings(max_examples=200, deadline=None)
@given(env=st.dictionaries(st.sampled_from(LAUNCH_VARS), st.one_of(st.integers(-3, 70000).map(str),
                                                                   st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6))))
def test_a_launch_environment_gives_a_rank_of_the_group_or_one_line(env):
    """Whatever a launcher (or a user) leaves in the environment: a rank of the group, or one line naming
    the variable."""
    with patch.dict(os.environ, {**env, "MASTER_ADDR": "127.0.0.1"}, clear=True):
        try:
            rank, local_rank, world_size = env_ranks(os.environ)
            _, port = master_address()
        except UserError as e:
            assert "\n" not in str(e) and any(name in str(e) for name in LAUNCH_VARS), e
            return
    assert 0 <= rank < world_size and local_rank >= 0 and 0 < port < 65536

"""Two torchrun agents as two nodes of one job on this machine (c10d rendezvous on 127.0.0.1, 2 gloo workers
each): global vs local ranks, data shards by global rank, files from global rank 0 only, one process's weights."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import child_env, finish, make_dataset, run_script, start, tiny_overrides
from data.dataset import BatchPlan, load_split
from test_distributed import CORPUS, HELPER, RUN, STEPS, assert_same_training, free_port, global_batches

pytestmark = pytest.mark.slow

NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE


def agent_cmd(node_rank: int, port: int, *args: str | Path) -> list[str]:
    """One node's torchrun. With c10d, --node_rank is only a hint: the rendezvous numbers the nodes."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", f"--nproc_per_node={PER_NODE}",
            f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=multinode-test", "--max-restarts=0", *map(str, args)]


def tagged_pids(tag: str) -> list[int]:
    """Every live process whose environment carries tag, orphans included."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"MULTINODE_TEST={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    return pids


@contextmanager
def nodes(*node_args: list[str | Path], env: dict[str, str]) -> Iterator[list[subprocess.Popen]]:
    """One torchrun agent per node_args, started at once and waited for (a hang fails the test). Every process
    they started is killed on exit: torchrun puts each worker in its own session, out of the agent's group."""
    tag = uuid.uuid4().hex
    env = dict(env, MULTINODE_TEST=tag)
    port = free_port()
    try:
        procs = [start(agent_cmd(rank, port, *args), env, merge_stderr=True) for rank, args in enumerate(node_args)]
        outs = [finish(p, timeout=300).stdout for p in procs]
        assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(outs)
        yield procs
    finally:
        for pid in tagged_pids(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class Runs:
    dir: Path
    ranks: list[dict]  # what each rank recorded, by global rank
    folders: list[Path]  # each node's output folder, by node rank as the rendezvous numbered them


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """20 steps of 1 process x batch 4, and of 2 nodes x 2 ranks x batch 1; each node writes to its own folder,
    as to a node-local disk."""
    tmp = tmp_path_factory.mktemp("multinode")
    data = make_dataset(tmp / "data", CORPUS)
    run_script("train_single.py", "--device", "cpu", *tiny_overrides(data, tmp / "one", train__batch_size=4, **RUN),
               check=True)
    env = child_env(RECORD_BATCHES=str(tmp / "batches"), RECORD_RANKS=str(tmp / "ranks"))
    args = [[HELPER, "--device", "cpu", *tiny_overrides(data, tmp / f"agent{a}", train__batch_size=1, **RUN)]
            for a in range(NODES)]
    with nodes(*args, env=env) as procs:
        agent_of = {p.pid: a for a, p in enumerate(procs)}
    ranks = sorted((json.loads(p.read_text()) for p in (tmp / "ranks").glob("rank*.json")), key=lambda r: r["rank"])
    folders = {r["group_rank"]: tmp / f"agent{agent_of[r['agent_pid']]}" for r in ranks}
    return Runs(tmp, ranks, [folders[n] for n in range(NODES)])


def test_ranks_are_global_across_nodes_and_local_within_a_node(runs):
    """4 ranks 0-3 over 2 nodes: rank = node x 2 + local rank, local ranks 0-1 on each node (the device index)."""
    records = runs.ranks
    assert [r["rank"] for r in records] == list(range(WORLD))
    assert all(r["world_size"] == WORLD and r["device"] == "cpu" for r in records)
    assert sorted((r["group_rank"], r["local_rank"]) for r in records) == [(n, i) for n in range(NODES)
                                                                           for i in range(PER_NODE)]
    assert all(r["rank"] == r["group_rank"] * PER_NODE + r["local_rank"] for r in records)


def test_shards_follow_the_global_rank(runs):
    """Each rank trains on the shard of its global rank; together they are one process's global batches."""
    train = load_split(runs.dir / "data", "train")
    batches = global_batches(runs.dir / "batches")
    one = BatchPlan(train, 32, 4, 1, rank=0, world_size=1, seed=1337)
    assert batches == {step: one.window_starts(step, 0).tolist() for step in range(STEPS)}
    for rank in range(WORLD):
        plan = BatchPlan(train, 32, 1, 1, rank=rank, world_size=WORLD, seed=1337)
        lines = (runs.dir / f"batches/rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["starts"] for line in lines] == [plan.window_starts(s, 0).tolist()
                                                                 for s in range(STEPS)]


def test_only_global_rank_zero_writes(runs):
    """The node holding global rank 0 has the checkpoints and logs; the other node's local rank 0 wrote nothing."""
    writer, other = runs.folders
    assert sorted(p.name for p in (writer / "ckpt").iterdir()) == [
        "best_model.pt", "config.yaml", "last_checkpoint.pt", "step_0000010.pt", "step_0000020.pt"]
    assert len(list((writer / "logs/tensorboard").iterdir())) == 1
    assert not other.exists() or not [p for p in other.rglob("*") if p.is_file()]


def test_two_nodes_match_one_process(runs):
    """2 nodes x 2 ranks x batch 1 end with the weights, losses and gradient norms of 1 process x batch 4."""
    assert_same_training(runs.dir / "one", runs.folders[0])

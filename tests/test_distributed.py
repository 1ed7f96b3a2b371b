"""DDP with real torchrun/gloo processes on CPU: the same weights as one process, disjoint data shards,
files written by rank 0 only, checkpoints that load anywhere, and a failing rank that ends the job."""

import json
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (TINY_TEXT, child_env, finish, load_weights, make_dataset, read_until, run_script, run_torchrun,
                      start, tb_runs, tiny_overrides, torchrun_cmd)
from data.dataset import BatchPlan, load_split
from utils.distributed.rendezvous import env_ranks, slurm_master_addr

HELPER = "tests/helpers/instrumented_ddp.py"
STEPS = 20
# Every run trains on a global batch of 4 windows of 32 bytes. The corpus holds 38 windows, so an epoch
# is 9 steps and 20 steps cover two whole epochs and part of a third.
CORPUS = TINY_TEXT[:1400]
RUN = dict(train__max_steps=STEPS, train__save_every=10, train__eval_every=10, train__log_every=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The same 20 steps three ways: 1 process x batch 4, 2 ranks x batch 2, 2 ranks x 2 micro-steps x batch 1."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_dataset(tmp / "data", CORPUS)
    run_script("train_single.py", "--device", "cpu", *tiny_overrides(data, tmp / "one", train__batch_size=4, **RUN),
               check=True)
    for name, batch, accum in (("two", 2, 1), ("two_accum", 1, 2)):
        overrides = tiny_overrides(data, tmp / name, train__batch_size=batch, train__grad_accum_steps=accum, **RUN)
        run_torchrun(2, HELPER, "--device", "cpu", *overrides, check=True,
                     env=child_env(RECORD_BATCHES=str(tmp / "batches" / name)))
    return tmp


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(run / "ckpt" / f"step_{STEPS:07d}.pt")


def tb_scalars(run: Path, tag: str) -> dict[int, float]:
    """A scalar by step, read back with TensorBoard's own reader."""
    (acc,) = tb_runs(run / "logs")
    return {e.step: e.value for e in acc.Scalars(tag)}


def assert_same_training(a: Path, b: Path) -> None:
    """Same final weights, and the same loss and gradient norm at every step.

    AdamW and clipping hide a gradient that is wrong by a constant factor; the logged norm does not.
    """
    for tag in ("train/loss", "train/grad_norm"):
        sa, sb = tb_scalars(a, tag), tb_scalars(b, tag)
        assert sa.keys() == sb.keys() == set(range(1, STEPS + 1))
        assert all(sa[s] == pytest.approx(sb[s], rel=1e-4) for s in sa), (tag, sa, sb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-5), (name, (wa[name] - wb[name]).abs().max())


def global_batches(records: Path) -> dict[int, list[int]]:
    """Window starts per step in global order (micro-step, then rank), as one process would take them."""
    seen = {}
    for path in records.glob("rank*.jsonl"):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            r = json.loads(line)
            seen[r["step"], r["micro_step"], rank] = r["starts"]
    return {step: [s for key in sorted(k for k in seen if k[0] == step) for s in seen[key]]
            for step in sorted({k[0] for k in seen})}


@pytest.mark.slow
def test_two_ranks_match_one_process(runs):
    """2 ranks x batch 2 end with the weights of 1 process x batch 4 on the same global batches (fp32)."""
    trained = final_weights(runs / "one")["tok_emb.weight"]
    assert not torch.equal(trained, load_weights(runs / "one/ckpt/step_0000010.pt")["tok_emb.weight"])
    assert_same_training(runs / "one", runs / "two")


@pytest.mark.slow
def test_two_ranks_with_accumulation_match_one_large_batch(runs):
    """2 ranks x 2 micro-steps x batch 1 end with the weights of 1 process x batch 4 (no accumulation)."""
    assert_same_training(runs / "one", runs / "two_accum")


@pytest.mark.slow
def test_ranks_train_on_disjoint_shards_covering_each_epoch(runs):
    """Real 2-rank runs: disjoint ranks, each epoch's windows seen once, a new order per epoch, 1-process batches."""
    two, accum = global_batches(runs / "batches/two"), global_batches(runs / "batches/two_accum")
    assert sorted(two) == sorted(accum) == list(range(STEPS))
    assert two == accum  # a separate run with the same seed sees the same batches, micro-steps or not
    plan = BatchPlan(load_split(runs / "data", "train"), 32, 4, 1, rank=0, world_size=1, seed=1337)
    assert all(two[step] == plan.window_starts(step, 0).tolist() for step in two)
    epochs = []
    for epoch in (0, 1):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        windows = [w for step in steps for w in two[step]]
        assert len(set(windows)) == len(windows) == plan.steps_per_epoch * 4 == plan.n_windows // 4 * 4
        assert len({w % 32 for w in windows}) == 1 and max(windows) + 33 <= len(plan.data)  # aligned, in range
        epochs.append([w // 32 for w in windows])  # window index, whatever the phase
    assert epochs[0] != epochs[1]


@pytest.mark.slow
def test_only_rank_zero_writes(runs):
    """After a 2-rank run: the expected checkpoints, one log and metrics file, one TensorBoard run, nothing else."""
    run = runs / "two"
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == [
        "best_model.pt", "config.yaml", "last_checkpoint.pt", "step_0000010.pt", "step_0000020.pt"]
    logs = sorted(p.name for p in (run / "logs").iterdir())
    assert len(logs) == 3 and logs[0] == "tensorboard" and logs[1].endswith(".log") and logs[2].endswith(".metrics.jsonl")
    assert len(list((run / "logs/tensorboard").iterdir())) == 1


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_in_one_process_and_samples(runs, tmp_path):
    """A 2-rank checkpoint continues in train_single.py (max_steps raised) and samples in inference.py."""
    ckpt = runs / "two/ckpt/step_0000020.pt"
    overrides = tiny_overrides(runs / "data", tmp_path, train__batch_size=4, **{**RUN, "train__max_steps": 24})
    proc = run_script("train_single.py", "--device", "cpu", "--resume", ckpt, *overrides, check=True)
    assert f"resumed from {ckpt} at step 20" in proc.stdout and "done: 24 steps" in proc.stdout
    assert torch.load(tmp_path / "ckpt/step_0000024.pt", weights_only=True)["trainer"]["step"] == 24
    sample = run_script("inference.py", "--checkpoint", runs / "two/ckpt/best_model.pt", "--prompt", "the quick",
                        "--max-new-tokens", "20", "--seed", "0", check=True)
    assert sample.stdout.startswith("the quick") and len(sample.stdout) > len("the quick")


STARTUP_S = 300  # start-up alone (python, torch, the group) under heavy load; the bounds under test are tighter
FAULT = dict(train__max_steps=200, train__eval_every=0, train__save_every=0, train__sample_tokens=0)


@pytest.mark.slow
def test_failing_rank_ends_the_torchrun_job(tiny_data, tmp_path):
    """Rank 1 raising at step 2 makes torchrun exit non-zero within seconds, not at distributed.timeout_s."""
    cmd = torchrun_cmd(2, HELPER, "--device", "cpu", *tiny_overrides(tiny_data, tmp_path, **FAULT))
    # the injected fault is a bug to the boundary: its traceback file goes to this test's folder (TMPDIR)
    proc = start(cmd, child_env(FAIL_RANK="1", FAIL_AT_STEP="2", TMPDIR=str(tmp_path)), merge_stderr=True)
    head = read_until(proc, "global batch: ", timeout=STARTUP_S)
    out = "".join(head) + finish(proc, timeout=60).stdout
    assert proc.returncode != 0 and "injected fault on rank 1 at step 2" in out
    assert "done:" not in out


@pytest.mark.slow
@pytest.mark.parametrize("strategy, rank1_overrides, exit_code", [("ddp", "", 0), ("fsdp", "", 0), ("ddp", "optim.lr=0.5", 1)],
                         ids=["ddp finished", "fsdp finished", "refused"])
def test_gloo_workers_are_joined_before_the_interpreter_exits(tiny_data, tmp_path, strategy, rank1_overrides, exit_code):
    """A run that ends, finished or refused (ranks that disagree: a UserError right after a collective), leaves
    no gloo worker thread for interpreter exit. There, a worker still releasing the last collective's tensors
    needs the GIL and is torn down mid-destructor: SIGABRT, "terminate called without an active exception",
    exit -6 after a run that succeeded (seen about 1 run in 10 on 2 busy cores)."""
    out = tmp_path / "threads"
    proc = run_torchrun(2, HELPER, "--device", "cpu", *tiny_overrides(tiny_data, tmp_path, train__max_steps=2,
                                                                       distributed__strategy=strategy),
                        env=child_env(RECORD_THREADS=str(out), RANK1_OVERRIDES=rank1_overrides))
    assert proc.returncode == exit_code and "SIGABRT" not in proc.stderr, proc.stderr
    if exit_code:  # torchrun's failure report ends with the refusal's own line, not "To enable traceback"
        root_cause = proc.stderr.split("Root Cause")[1]
        assert "traceback : error: the ranks disagree on optim.lr" in root_cause, proc.stderr
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    if not all(r["started"] for r in records):
        pytest.skip(f"torch {torch.__version__} does not name gloo's worker threads, so they cannot be counted")
    assert [r["after"] for r in records] == [0, 0], records


@pytest.mark.slow
def test_ddp_does_not_broadcast_the_rope_tables_before_each_forward(tiny_data, tmp_path):
    """The RoPE tables are the model's only buffers and alike on every rank (a function of the config): DDP is
    built not to sync buffers in forward, so after its construction no rank makes another coalesced broadcast;
    and not through the flag torch 2.13 deprecates (broadcast_buffers, with a FutureWarning)."""
    out = tmp_path / "broadcasts"
    proc = run_torchrun(2, HELPER, "--device", "cpu", *tiny_overrides(tiny_data, tmp_path, model__pos_emb="rope"),
                        env=child_env(COUNT_BROADCASTS=str(out)), check=True)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records == [{"after_wrap": 0, "buffers": ["module.rope_cos", "module.rope_sin"]}] * 2, records
    assert "broadcast_buffers" not in proc.stderr, proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_failing_rank_ends_a_plain_srun_style_job(tiny_data, tmp_path):
    """Two processes started as srun starts tasks (SLURM_PROCID, no torchrun): rank 1 fails, rank 0 follows."""
    base = {k: v for k, v in child_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    # MASTER_ADDR comes from the node list, as on a cluster
    base.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()),
                FAIL_RANK="1", FAIL_AT_STEP="2", TMPDIR=str(tmp_path))  # the fault's traceback file lands there
    cmd = [sys.executable, HELPER, "--device", "cpu", *tiny_overrides(tiny_data, tmp_path, **FAULT)]
    procs = [start(cmd, dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)), merge_stderr=True) for r in (0, 1)]
    head = read_until(procs[0], "global batch: ", timeout=STARTUP_S)
    rank0, rank1 = (finish(p, timeout=60) for p in procs)
    assert rank1.returncode != 0 and "injected fault on rank 1 at step 2" in rank1.stdout
    rank0_out = "".join(head) + rank0.stdout
    assert rank0.returncode == 1 and "error: rank 1 ended before the run finished" in rank0_out, rank0_out
    assert "Traceback" not in rank0_out


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1])
def test_killed_rank_of_plain_processes_ends_the_other_with_one_line(tiny_data, tmp_path, killed):
    """Two plain processes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; no torchrun): SIGKILL of one rank
    mid-run ends the other within 30 s, exit 1, with one line naming the dead rank and no traceback."""
    base = {k: v for k, v in child_env().items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "train_ddp.py", "--device", "cpu", *tiny_overrides(tiny_data, tmp_path, **FAULT)]
    procs = [start(cmd, dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    read_until(procs[0], "step 3/", timeout=STARTUP_S)  # both ranks are past their first collectives
    procs[killed].kill()
    killed_at = time.monotonic()
    survivor = finish(procs[1 - killed], timeout=30)
    assert time.monotonic() - killed_at < 30
    assert survivor.returncode == 1, survivor.stderr
    assert survivor.stderr.splitlines() == [
        f"error: rank {killed} ended before the run finished (killed, crashed or its host lost; see its own "
        f"output); stopping rank {1 - killed} as well"]


@pytest.mark.parametrize("die_after, named, at_least", [
    (1.5, "rank 0", 1.5),  # the news comes after GRACE_S: still awaited, and the dead rank is named
    pytest.param(-1, "another rank", 4.0, marks=pytest.mark.slow),  # no news (its host lost): PEER_GONE_S, the line
])
def test_a_collective_that_saw_its_peer_go_waits_to_name_it(die_after, named, at_least):
    """A rank whose collective failed with "Connection closed by peer" (Watchdog.stop(peer_gone=True); the
    helper's waits are shortened): it waits for the watchdog's news longer than for an ordinary error, names
    the rank that ended when the news comes, says "another rank" when none comes, and exits 1 with one line."""
    rank0 = start([sys.executable, "tests/helpers/peer_gone.py", "0", str(die_after)])
    port = read_until(rank0, "port ", timeout=STARTUP_S)[-1].split()[1]
    rank1 = finish(start([sys.executable, "tests/helpers/peer_gone.py", "1", port]), timeout=STARTUP_S)
    waited = time.monotonic() - float(rank1.stdout.split()[-1])
    assert rank1.returncode == 1 and rank1.stdout.startswith("failing at "), (rank1.stdout, rank1.stderr)
    assert rank1.stderr.splitlines() == [
        f"error: {named} ended before the run finished (killed, crashed or its host lost; see its own output); "
        f"stopping rank 1 as well"]
    assert at_least <= waited < 30, waited


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, (3, 1, 4)),  # torchrun
    ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}, (5, 1, 8)),  # srun tasks, no torchrun
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16"},
     (9, 1, 16)),  # torchrun under srun: torchrun's numbering wins
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 0, 1)),  # a one-task job
    ({}, (0, 0, 1)),
])
def test_env_ranks(env, expected):
    """(rank, local_rank, world_size) from torchrun's variables, else srun's, else a single process."""
    assert env_ranks(env) == expected


@pytest.mark.parametrize("nodelist, first", [
    # the answers of `scontrol show hostnames NODELIST | head -n1` (slurm 22.05)
    ("gpu[03-05,9],cpu1", "gpu03"), ("node1", "node1"), ("gpu-[001-004]", "gpu-001"), ("n[7,3-4]", "n7"),
    ("a,b[2-3]", "a"), ("rack[1-2]-node[01-04]", "rack1-node01"), ("localhost", "localhost"),
])
def test_slurm_master_addr(nodelist, first):
    """The rendezvous host of a plain srun launch is the allocation's first node."""
    assert slurm_master_addr(nodelist) == first

"""FSDP2 with real torchrun/gloo processes on CPU: the same training as DDP and one process, sharded
checkpoints that resume exactly, reshard between world sizes, survive a crash mid-save, and convert
to the single-file format that inference reads."""

import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_TEXT, child_env, load_weights, make_dataset, run_here, run_script, run_torchrun, tb_runs, \
    tiny_overrides
from utils.checkpoint import sharded
from utils.checkpoint.folder import Checkpointer
from utils.distributed.process_group import DistInfo

PROBE = "tests/helpers/fsdp_probe.py"
STEPS = 6  # saves at 3 and 6; every run trains on a global batch of 4 windows of 32 bytes
FSDP = dict(distributed__strategy="fsdp", train__max_steps=STEPS)
REL = 1e-6


def overrides(runs: Path, name: str, batch: int, accum: int = 1, **extra) -> list[str]:
    return tiny_overrides(runs / "data", runs / name, train__batch_size=batch, train__grad_accum_steps=accum,
                          **{**FSDP, **extra})


def resume_from(runs: Path, source: str, name: str) -> None:
    """A new run folder that holds only source's step-3 checkpoint, as if that run had stopped there."""
    (runs / name / "ckpt").mkdir(parents=True)
    shutil.copytree(runs / source / "ckpt/step_0000003", runs / name / "ckpt/step_0000003")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every run the tests compare, each started once (1 process x batch 4 = 2 ranks x batch 2)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    make_dataset(tmp / "data", TINY_TEXT[:1400])
    run_script("train_single.py", "--device", "cpu", *overrides(tmp, "one", 4), check=True)
    run_torchrun(2, "train_ddp.py", "--device", "cpu", *overrides(tmp, "ddp", 2, distributed__strategy="ddp"),
                 check=True)
    run_torchrun(2, PROBE, "--device", "cpu", *overrides(tmp, "fsdp", 2), check=True,
                 env=child_env(LOGITS_OUT=str(tmp / "fsdp_logits.pt")))
    run_torchrun(2, "train_ddp.py", "--device", "cpu", *overrides(tmp, "fsdp_accum", 1, 2, train__keep_last=1),
                 check=True)
    muon = dict(optim__name="muon", optim__muon_lr=0.02)
    run_script("train_single.py", "--device", "cpu", *overrides(tmp, "one_muon", 4, **muon), check=True)
    run_torchrun(2, "train_ddp.py", "--device", "cpu", *overrides(tmp, "fsdp_muon", 2, **muon), check=True)
    # killed while publishing step 6, then continued with --resume auto
    crash = run_torchrun(2, PROBE, "--device", "cpu", *overrides(tmp, "crash", 2), env=child_env(KILL_AT_STEP="6"))
    assert crash.returncode != 0, crash.stdout
    (tmp / "crash_listing.txt").write_text("\n".join(sorted(p.name for p in (tmp / "crash/ckpt").iterdir())))
    resumable = Checkpointer(tmp / "crash/ckpt", 2, DistInfo(0, 0, 1, torch.device("cpu"), None), sharded=True)
    (tmp / "crash_latest.txt").write_text(str(resumable.find_resume("auto", warn=print)[0]))
    run_torchrun(2, "train_ddp.py", "--device", "cpu", "--resume", "auto", *overrides(tmp, "crash", 2), check=True)
    resume_from(tmp, "fsdp", "two_to_one")
    run_script("train_single.py", "--device", "cpu", "--resume", "auto", *overrides(tmp, "two_to_one", 4),
               check=True)
    resume_from(tmp, "one", "one_to_two")
    run_torchrun(2, "train_ddp.py", "--device", "cpu", "--resume", "auto", *overrides(tmp, "one_to_two", 2),
                 check=True)
    return tmp


def final_weights(runs: Path, name: str) -> dict[str, torch.Tensor]:
    ckpt = runs / name / "ckpt"
    if (ckpt / f"step_{STEPS:07d}.pt").is_file():
        return load_weights(ckpt / f"step_{STEPS:07d}.pt")
    return sharded.full_model_state(ckpt / f"step_{STEPS:07d}")[0]


def losses(runs: Path, name: str) -> dict[int, float]:
    """train/loss by step over every TensorBoard run of a run folder (a resumed run writes two)."""
    return {e.step: e.value for acc in tb_runs(runs / name / "logs") for e in acc.Scalars("train/loss")}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all weights together, after checking no single weight is off by 1e-6.

    Not per tensor: the attention key bias has a zero gradient in exact arithmetic (softmax ignores
    it), so AdamW turns rounding noise into full-size steps there, in DDP as much as in FSDP.
    """
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    flat_a, flat_b = (torch.cat([w[k].flatten() for k in sorted(a)]) for w in (a, b))
    return ((flat_a - flat_b).norm() / flat_b.norm()).item()


def assert_same_curve(a: dict[int, float], b: dict[int, float], steps=range(1, STEPS + 1)) -> None:
    assert set(steps) <= a.keys() and set(steps) <= b.keys(), (a, b)
    assert all(a[s] == pytest.approx(b[s], rel=REL) for s in steps), (a, b)


@pytest.mark.slow
def test_fsdp_matches_ddp_and_one_process(runs):
    """FSDP on 2 ranks x batch 2 ends with the weights of DDP on 2 ranks and of 1 process x batch 4 (fp32)."""
    fsdp = final_weights(runs, "fsdp")
    start = sharded.full_model_state(runs / "fsdp/ckpt/step_0000003")[0]
    assert not torch.equal(fsdp["tok_emb.weight"], start["tok_emb.weight"])  # it trained
    assert relative_difference(fsdp, final_weights(runs, "ddp")) < REL
    assert relative_difference(fsdp, final_weights(runs, "one")) < REL
    assert_same_curve(losses(runs, "fsdp"), losses(runs, "ddp"))
    assert_same_curve(losses(runs, "fsdp"), losses(runs, "one"))


@pytest.mark.slow
def test_fsdp_muon_matches_one_process(runs):
    """Muon under FSDP gathers each shard's matrix, orthogonalises the stack and keeps its own part:
    the same weights and curve as one process."""
    assert relative_difference(final_weights(runs, "fsdp_muon"), final_weights(runs, "one_muon")) < REL
    assert_same_curve(losses(runs, "fsdp_muon"), losses(runs, "one_muon"))


@pytest.mark.slow
def test_fsdp_accumulation_matches_one_large_batch(runs):
    """2 ranks x 2 micro-steps x batch 1 (reduce-scatter skipped on the first) = 1 process x batch 4; keep_last=1."""
    assert relative_difference(final_weights(runs, "fsdp_accum"), final_weights(runs, "one")) < REL
    assert_same_curve(losses(runs, "fsdp_accum"), losses(runs, "one"))
    assert sorted(p.name for p in (runs / "fsdp_accum/ckpt").iterdir()) == ["best_model", "config.yaml",
                                                                            "step_0000006"]


@pytest.mark.slow
def test_crash_during_sharded_save_keeps_previous_checkpoint(runs):
    """SIGKILL after every shard and .metadata of step 6 are written: step 3 stays the newest valid folder."""
    listing = (runs / "crash_listing.txt").read_text().split()
    assert ".step_0000006.partial" in listing and "step_0000006" not in listing and "step_0000003" in listing
    assert (runs / "crash_latest.txt").read_text() == str(runs / "crash/ckpt/step_0000003")
    assert not list((runs / "crash/ckpt").glob(".*.partial"))  # the resumed run removed the half-published folder


@pytest.mark.slow
def test_sharded_resume_is_bit_exact(runs):
    """The run resumed from step 3 after the crash ends bit for bit where the uninterrupted run ends."""
    resumed, uninterrupted = final_weights(runs, "crash"), final_weights(runs, "fsdp")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    curve, reference = losses(runs, "crash"), losses(runs, "fsdp")
    assert all(curve[s] == reference[s] for s in range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("name, reference", [("two_to_one", "fsdp"), ("one_to_two", "one")])
def test_reshard_continues_the_loss_curve(runs, name, reference):
    """Saved on 2 ranks, resumed on 1 (and 1 -> 2): steps 4-6 follow the uninterrupted run within fp32 noise."""
    assert_same_curve(losses(runs, name), losses(runs, reference), steps=range(4, STEPS + 1))
    assert relative_difference(final_weights(runs, name), final_weights(runs, reference)) < REL


@pytest.mark.slow
def test_converted_checkpoint_gives_the_sharded_models_logits(runs, tmp_path):
    """convert_checkpoint.py's file loads in inference: the logits of the 2-rank sharded model, and samples."""
    from utils.checkpoint.reader import load_model
    from tests.helpers.fsdp_probe import PROBE_INPUT

    out = tmp_path / "model.pt"
    run_script("-m", "scripts.convert_checkpoint", "--checkpoint", runs / "fsdp/ckpt/step_0000006", "--out", out,
               check=True)
    with torch.no_grad():
        logits, _ = load_model(out, torch.device("cpu"))(PROBE_INPUT)
    assert torch.allclose(logits, torch.load(runs / "fsdp_logits.pt"), rtol=1e-5, atol=1e-6)
    sample = run_script("inference.py", "--checkpoint", out, "--prompt", "the quick", "--max-new-tokens", "8",
                        check=True)
    assert sample.stdout.startswith("the quick")


def test_fsdp_refuses_fp16(tiny_data, tmp_path, capfd):
    """fp16 under FSDP stops before training with one line (no sharded GradScaler)."""
    proc = run_here(capfd, "train_single.py", "--device", "cpu",
                    *tiny_overrides(tiny_data, tmp_path, distributed__strategy="fsdp", train__precision="fp16"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: distributed.strategy=fsdp does not support train.precision=fp16 (FSDP2 has no sharded "
        "GradScaler); use train.precision=bf16 or fp32"]


@pytest.mark.slow
def test_auto_precision_reaches_the_fsdp_wrapper(tiny_data, tmp_path):
    """train.precision=auto resolved to bf16 (the CPU measurement made to find it faster) is what FSDP's
    mixed-precision policy gets: every forward runs on weights all-gathered in bf16."""
    gathered = tmp_path / "gathered.txt"
    run_torchrun(2, PROBE, "--device", "cpu",
                 *tiny_overrides(tiny_data, tmp_path, distributed__strategy="fsdp", train__precision="auto",
                                 train__max_steps=2, train__eval_every=0),
                 env=child_env(AUTO_MEASURES="bf16", GATHERED_DTYPE=str(gathered)), check=True)
    assert (tmp_path / "ckpt/config.yaml").read_text().count("precision: bf16") == 1
    dtypes = gathered.read_text().split()
    assert len(dtypes) >= 4 and set(dtypes) == {"torch.bfloat16"}, dtypes

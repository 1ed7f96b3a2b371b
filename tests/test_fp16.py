"""fp16 with a GradScaler through non-finite steps: the scaler's state is reset every step, the ranks decide
each step together (one rank's NaN loss never splits them), and train.max_nonfinite_steps stops the run."""

import json
import math

import pytest
import torch

from conftest import child_env, run_torchrun, tiny_overrides
from test_trainer import make_trainer
from utils.train.health import TrainingDiverged

HELPER = "tests/helpers/poison_rank.py"


def nan_loss(trainer):
    """A hook that makes the model's loss NaN (its gradients follow) until removed."""
    return trainer.raw.register_forward_hook(lambda m, args, out: (out[0], out[1] * float("nan")))


def test_fp16_trains_on_after_a_non_finite_step(tiny_data, tmp_path):
    """A NaN loss in fp16 skips that update, and the next steps apply again (no 'unscale_() has already
    been called')."""
    trainer = make_trainer(tiny_data, tmp_path, train__precision="fp16", train__max_steps=8)
    assert trainer.scaler.is_enabled()
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.raw.state_dict().items()}
    hook = nan_loss(trainer)
    _, _, applied = trainer.train_step()
    hook.remove()
    assert not applied and trainer.guard.streak == 1 and trainer.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.raw.state_dict().items())
    results = [trainer.train_step() for _ in range(3)]
    assert trainer.guard.streak == 0 and all(math.isfinite(loss) for loss, _, _ in results)


def test_fp16_max_nonfinite_steps_stops_the_run(tiny_data, tmp_path):
    """train.max_nonfinite_steps NaN losses in a row raise TrainingDiverged in fp16 too."""
    trainer = make_trainer(tiny_data, tmp_path, train__precision="fp16", train__max_nonfinite_steps=3)
    nan_loss(trainer)
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(TrainingDiverged, match="non-finite for 3 steps in a row"):
        trainer.train_step()


@pytest.mark.slow
def test_one_poisoned_rank_does_not_split_the_ranks(tiny_data, tmp_path):
    """2 gloo ranks in fp16, rank 1's loss NaN at steps 2 and 3: both ranks skip those steps, keep one scale at
    every step, and finish; with the poison at every step both stop at train.max_nonfinite_steps."""
    overrides = tiny_overrides(tiny_data, tmp_path / "run", train__precision="fp16", train__eval_every=0)
    env = child_env(POISON_RANK="1", POISON_STEPS="2,3", RECORD_SCALE=str(tmp_path / "scale"))
    run_torchrun(2, HELPER, "--device", "cpu", *overrides, env=env, check=True)
    ranks = [[json.loads(line) for line in (tmp_path / "scale" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 6
    assert [r["applied"] for r in ranks[0]][2:4] == [False, False], ranks[0]

    overrides = tiny_overrides(tiny_data, tmp_path / "diverged", train__precision="fp16", train__eval_every=0,
                               train__max_nonfinite_steps=2)
    proc = run_torchrun(2, HELPER, "--device", "cpu", *overrides, env=child_env(POISON_RANK="1", POISON_STEPS="all"))
    assert proc.returncode != 0
    diverged = [line for line in proc.stderr.splitlines()
                if line.startswith("error: loss or gradient norm was non-finite for 2 steps in a row (step 2)")]
    assert len(diverged) == 2, proc.stderr  # both ranks, at the same step



def test_a_bf16_run_continues_in_fp16(tiny_data, tmp_path):
    """Resuming a run trained without a GradScaler (bf16) in fp16 starts a fresh scaler and trains on."""
    bf16 = make_trainer(tiny_data, tmp_path, train__precision="bf16")
    bf16.train_step()
    bf16.checkpointer.dir.mkdir(parents=True)  # run_training's accept() makes the folder
    bf16.save()
    (path,) = [p for _, p in bf16.checkpointer.step_files()]
    fp16 = make_trainer(tiny_data, tmp_path, train__precision="fp16")
    fp16.restore(str(path), fp16.checkpointer.load(path))
    assert fp16.step == 1 and fp16.scaler.is_enabled() and fp16.scaler.get_scale() == 2.0 ** 16
    assert math.isfinite(fp16.train_step()[0]) and fp16.step == 2


def test_an_fp16_overflow_is_counted_as_a_skipped_step(tiny_data, tmp_path):
    """A loss scale so large that the gradients overflow: the update is not applied, and the step is counted as
    skipped (the GradScaler changes its scale only in update(), so comparing scales around step() saw nothing);
    the loss is finite, so it is not a health event."""
    trainer = make_trainer(tiny_data, tmp_path, train__precision="fp16", train__max_steps=8)
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.raw.state_dict().items()}
    trainer.scaler.update(2.0 ** 120)  # every fp16 gradient overflows at this scale
    loss, norm, applied = trainer.train_step()
    assert math.isfinite(loss) and not math.isfinite(norm) and not applied
    assert trainer.skipped_steps == 1 and trainer.guard.events == []
    assert all(torch.equal(before[k], v) for k, v in trainer.raw.state_dict().items())
    assert trainer.scaler.get_scale() == 2.0 ** 119  # the scaler saw the overflow, too

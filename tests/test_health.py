"""Run health: the detector, the skip / rollback / stop actions on a poisoned data window, the events they
write, and resume continuity (utils/train/health.py, utils/train/guard.py)."""

import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import child_env, run_torchrun, tiny_overrides
from models.config import HealthConfig
from test_trainer import make_trainer
from utils.checkpoint.format import load_checkpoint
from utils.metrics.logger import MetricsLogger
from utils.train.health import HEALTHY, NONFINITE, RunUnhealthy, SpikeDetector, median_mad, robust_z

HELPER = "tests/helpers/poison_window.py"
finite = st.floats(min_value=1e-3, max_value=1e3)


def fed(history, window=100):
    """A detector on the CPU that accepted these (loss, norm) values."""
    detector = SpikeDetector(HealthConfig(window=window, arm_after=min(50, window)), torch.device("cpu"))
    for h in history:
        detector.accept(torch.tensor(h, dtype=torch.float64), torch.tensor(h, dtype=torch.float64), torch.tensor(True))
    return detector


def verdict(detector, loss, norm):
    return int(detector.judge(torch.tensor(loss), torch.tensor(norm))["verdict"])


@settings(max_examples=50, deadline=None)
@given(history=st.lists(finite, min_size=50, max_size=100), value=finite)
def test_no_value_at_or_below_the_median_is_a_spike(history, value):
    """Only rises are judged: a loss at or below the window's median is never an event."""
    detector = fed(history)
    median = sorted(history)[len(history) // 2]
    assert verdict(detector, min(value, median), min(value, median)) == HEALTHY
    assert verdict(detector, math.nan, 1.0) == verdict(detector, 1.0, math.inf) == NONFINITE


@settings(max_examples=50, deadline=None)
@given(history=st.lists(finite, min_size=1, max_size=60), window=st.integers(1, 40), value=finite)
def test_the_device_window_judges_as_the_list_of_its_last_values(history, window, value):
    """The ring buffer on the device holds the last `window` values: its median, deviation and z-score are
    those of that list computed on the host (robust_z), whatever its fill, and it saves and loads as the list."""
    detector = fed(history, window)
    last = history[-window:]
    median, mad = detector.losses.median_mad()
    assert (float(median), float(mad)) == pytest.approx(median_mad(last), rel=1e-6)
    z = float(detector.judge(*[torch.tensor(value, dtype=torch.float64)] * 2)["loss_z"])
    assert z == pytest.approx(robust_z(value, last, HealthConfig().min_rel_rise), rel=1e-4, abs=1e-4)
    assert detector.losses.state_dict() == pytest.approx(last)
    again = fed([], window)
    again.load_state_dict(detector.state_dict())
    assert float(again.losses.median_mad()[0]) == pytest.approx(float(median))


def test_robust_z_ignores_the_outliers_it_looks_for():
    """One earlier spike in the window does not raise the bar for the next (a standard deviation would)."""
    history = [2.0 + 0.01 * (i % 5) for i in range(99)] + [50.0]
    assert robust_z(3.0, history, 0.0) > 40


def final_state(path):
    """The weights of a checkpoint file, or of a sharded checkpoint folder (read on one process)."""
    if path.is_dir():
        from utils.checkpoint.sharded import full_model_state

        return full_model_state(path)[0]
    return load_checkpoint(path)["model"]


def poison(trainer, data_steps, nan=False):
    """The windows of these data steps (0-based plan indices) get random targets (or a NaN loss): the loss jumps."""
    batch = trainer.plan.batch

    def poisoned(step, micro_step, device):
        x, y = batch(step, micro_step, device)
        if step in data_steps:
            y = torch.randint(0, 256, y.shape, generator=torch.Generator().manual_seed(step))
        return x, y
    trainer.plan.batch = poisoned


def skip_ahead(trainer, from_step, by):
    """The reference: from data step from_step on, the plan reads `by` steps further (the windows never seen)."""
    batch = trainer.plan.batch
    trainer.plan.batch = lambda step, micro_step, device: batch(step + by * (step >= from_step), micro_step, device)


def train_to(trainer, steps):
    while trainer.step < steps:
        trainer.train_step()


def test_rollback_ends_with_the_weights_of_a_run_that_never_saw_the_window(tiny_data, tmp_path):
    """Defaults, 250 steps: a loss spike at step 200 is caught, rolled back to the snapshot of step 150, and
    the run ends bit for bit where a run that skipped data steps 151-200 ends; that clean run has no event."""
    logger = MetricsLogger(tmp_path / "logs", is_main=True)
    spiked = make_trainer(tiny_data, tmp_path / "a", train__max_steps=250, health__action="rollback")
    spiked.log = spiked.guard.log = logger
    poison(spiked, {199})
    train_to(spiked, 250)
    logger.close()
    clean = make_trainer(tiny_data, tmp_path / "b", train__max_steps=250, health__action="rollback")
    skip_ahead(clean, 150, 50)
    train_to(clean, 250)
    assert [(e.step, e.event, e.action, e.data_steps) for e in spiked.guard.events] == [(200, "spike", "rollback",
                                                                                          (151, 200))]
    assert clean.guard.events == [] and clean.guard.summary() == "health: no events"
    for (name, a), b in zip(spiked.raw.named_parameters(), clean.raw.parameters()):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in logger.jsonl.path.read_text().splitlines()]
    health = [r for r in rows if any(k.startswith("health/") for k in r)]
    assert len(health) == 1 and health[0]["step"] == 200 and health[0]["health/event"] == "spike"
    assert health[0]["health/action"] == "rollback" and health[0]["health/data_steps"] == [151, 200]
    assert spiked.state_dict()["health"]["data_offset"] == 50  # in every checkpoint, so a resume reads on exactly
    assert spiked.guard.summary() == "health: 1 event(s): 1 rollback (step 200); data steps skipped: 151-200"


@pytest.mark.slow
def test_a_resume_after_a_rollback_continues_exactly(tiny_data, tmp_path):
    """Rolled back at step 46, saved at 50, resumed in a new trainer: the same weights at 60 as without the
    interruption (the skipped windows travel in the checkpoint), and the summary still names the event."""
    settings = dict(train__max_steps=60, health__arm_after=10, health__window=20, health__action="rollback",
                    health__snapshot_every=10)
    whole = make_trainer(tiny_data, tmp_path / "whole", **settings)
    poison(whole, {45})
    train_to(whole, 60)
    first = make_trainer(tiny_data, tmp_path / "split", **settings)
    first.checkpointer.dir.mkdir(parents=True)
    poison(first, {45})
    train_to(first, 50)
    first.save()
    path = first.checkpointer.dir / "step_0000050.pt"
    second = make_trainer(tiny_data, tmp_path / "split", **settings)
    poison(second, {45})
    second.restore(str(path), second.checkpointer.load(path))
    train_to(second, 60)
    assert whole.guard.summary() == second.guard.summary() != "health: no events"
    for a, b in zip(whole.raw.parameters(), second.raw.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("nan", [False, True], ids=["spike", "nonfinite"])
def test_skip_leaves_the_weights_unchanged_at_that_step(tiny_data, tmp_path, nan):
    """health.action=skip: the poisoned step applies no update (spike or non-finite) and training goes on."""
    trainer = make_trainer(tiny_data, tmp_path, train__max_steps=60, health__arm_after=10, health__window=20)
    train_to(trainer, 45)
    before = [p.detach().clone() for p in trainer.raw.parameters()]
    hook = trainer.raw.register_forward_hook(lambda m, args, out: (out[0], out[1] * math.nan)) if nan else None
    if not nan:
        poison(trainer, {45})
    _, _, applied = trainer.train_step()
    assert not applied and trainer.step == 46 and trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.raw.parameters()))
    assert [(e.step, e.event, e.action) for e in trainer.guard.events] == [(46, "nonfinite" if nan else "spike",
                                                                            "skip")]
    if hook:
        hook.remove()
    assert trainer.train_step()[2]


def test_a_skipped_first_step_warns_nothing(tiny_data, tmp_path):
    """A non-finite first step is skipped with one health event and no warning (torch's LR scheduler
    warns when it steps before the optimizer ever did; that is the skip working, not a misuse)."""
    trainer = make_trainer(tiny_data, tmp_path, train__max_steps=5)
    hook = trainer.raw.register_forward_hook(lambda m, args, out: (out[0], out[1] * math.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not trainer.train_step()[2]
        hook.remove()
        assert trainer.train_step()[2]
    assert [(e.step, e.event) for e in trainer.guard.events] == [(1, "nonfinite")]


def test_skip_takes_a_rise_that_persists_as_the_new_level(tiny_data, tmp_path):
    """Every window from step 46 on has random targets: skipping cannot undo that, so after
    health.max_consecutive skips the detector re-arms on the new level and training goes on."""
    trainer = make_trainer(tiny_data, tmp_path, train__max_steps=80, health__arm_after=10, health__window=20)
    poison(trainer, set(range(45, 1000)))
    train_to(trainer, 80)
    assert [(e.step, e.event, e.action) for e in trainer.guard.events] == [
        *[(step, "spike", "skip") for step in range(46, 51)], (50, "level", "rebase")]
    assert trainer.skipped_steps == 5


def test_stop_saves_the_state_before_the_spike_and_exits_with_one_line(tiny_data, tmp_path):
    """health.action=stop: a checkpoint of the step before the event, then RunUnhealthy (one line, exit 2)."""
    trainer = make_trainer(tiny_data, tmp_path, train__max_steps=60, health__arm_after=10, health__window=20,
                           health__action="stop")
    trainer.checkpointer.dir.mkdir(parents=True)
    poison(trainer, {50})
    with pytest.raises(RunUnhealthy, match=r"health.action=stop: spike at step 51 .*--resume auto"):
        train_to(trainer, 60)
    assert trainer.step == 50 and (trainer.checkpointer.dir / "step_0000050.pt").is_file()


def test_a_rollback_to_step_0_goes_on(tiny_data, tmp_path):
    """A non-finite step 1 under health.action=rollback returns to step 0, the first snapshot, and the run goes
    on to train.max_steps (step 0 is a real step; train.stop_at_step=0 means off)."""
    trainer = make_trainer(tiny_data, tmp_path, train__max_steps=6, health__action="rollback")
    trainer.checkpointer.dir.mkdir(parents=True)
    hook = trainer.raw.register_forward_hook(lambda m, args, out: (out[0], out[1] * math.nan))
    trainer.advance()
    hook.remove()
    assert trainer.fit() == 0 and trainer.step == 6 and trainer.guard.rollbacks == 1


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_stop_saves_the_state_before_the_event_and_resumes_as_if_it_never_happened(tiny_data, tmp_path, optimizer):
    """health.action=stop at a non-finite step 6, with dropout: the checkpoint holds the state before step 6,
    its dropout RNG included, so a resume (the fault gone) ends bit for bit where an unbroken run ends."""
    settings = dict(train__max_steps=10, model__dropout=0.1, health__action="stop", optim__name=optimizer)
    whole = make_trainer(tiny_data, tmp_path / "whole", **settings)
    train_to(whole, 10)
    first = make_trainer(tiny_data, tmp_path / "split", **settings)
    first.checkpointer.dir.mkdir(parents=True)
    train_to(first, 5)
    hook = first.raw.register_forward_hook(lambda m, args, out: (out[0], out[1] * math.nan))
    with pytest.raises(RunUnhealthy, match="health.action=stop: nonfinite at step 6"):
        first.train_step()
    hook.remove()
    path = first.checkpointer.dir / "step_0000005.pt"
    second = make_trainer(tiny_data, tmp_path / "split", **settings)
    second.restore(str(path), second.checkpointer.load(path))
    train_to(second, 10)
    for a, b in zip(whole.raw.parameters(), second.raw.parameters()):
        assert torch.equal(a, b)


def test_a_run_that_keeps_spiking_stops_after_max_rollbacks(tiny_data, tmp_path):
    """Every window poisoned from step 46 on: health.max_rollbacks rollbacks, then one line naming the limit."""
    trainer = make_trainer(tiny_data, tmp_path, train__max_steps=60, health__arm_after=10, health__window=20,
                           health__action="rollback", health__snapshot_every=10, health__max_rollbacks=2,
                           health__max_consecutive=10)
    poison(trainer, set(range(45, 1000)))
    with pytest.raises(RunUnhealthy, match=r"after 2 rollbacks \(health.max_rollbacks=2\)"):
        train_to(trainer, 60)
    assert trainer.guard.rollbacks == 2 and trainer.step == 40


def test_rollback_lowers_the_lr_for_a_while(tiny_data, tmp_path):
    """rollback_lr_factor scales every group's LR for rollback_lr_steps steps after the rollback, then not."""
    trainer = make_trainer(tiny_data, tmp_path, train__max_steps=60, health__arm_after=10, health__window=20,
                           health__action="rollback", health__snapshot_every=10, health__rollback_lr_factor=0.5,
                           health__rollback_lr_steps=5)
    poison(trainer, {45})
    train_to(trainer, 42)
    lr_at_42 = trainer.optimizer.param_groups[0]["lr"]
    while not trainer.guard.rollbacks:  # the spike at step 46 rolls back to step 40
        trainer.train_step()
    assert trainer.step == 40
    train_to(trainer, 42)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr_at_42)
    train_to(trainer, 46)
    assert trainer.optimizer.param_groups[0]["lr"] == trainer.scheduler.get_last_lr()[0]


def test_a_resume_on_other_data_is_reported_in_one_line(tiny_data, tmp_path):
    """The first losses after a resume are compared with the window saved in the checkpoint: the same data
    continues silently, other data (here: random targets) is one resume_jump event."""
    first = make_trainer(tiny_data, tmp_path / "a", train__max_steps=200)
    first.checkpointer.dir.mkdir(parents=True)
    train_to(first, 150)
    first.save()
    path = first.checkpointer.dir / "step_0000150.pt"
    for changed in (False, True):
        resumed = make_trainer(tiny_data, tmp_path / "a", train__max_steps=200)
        resumed.restore(str(path), resumed.checkpointer.load(path))
        if changed:
            poison(resumed, set(range(1000)))
        train_to(resumed, 156)
        events = [(e.step, e.event) for e in resumed.guard.events]
        assert events == ([(155, "resume_jump")] if changed else []), events
    assert "did the data folder, the config or the code change?" in resumed.guard.events[0].detail


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_roll_back_together_to_the_run_that_never_saw_the_window(tiny_data, tmp_path, strategy):
    """2 gloo ranks with accumulation, rank 1's loss NaN at step 8 (only there): both ranks roll back to step 5 on the same verdict
    and end bit for bit where a 2-rank run that skipped data steps 6-8 ends."""
    runs = {}
    for name, env in (("spiked", {"POISON": "7", "POISON_NAN_RANK": "1"}), ("clean", {"SKIP_AHEAD": "5:3"})):
        overrides = tiny_overrides(tiny_data, tmp_path / name, train__max_steps=12, train__eval_every=0,
                                   train__save_every=0, train__batch_size=2, train__grad_accum_steps=2,
                                   health__action="rollback", health__snapshot_every=5, distributed__strategy=strategy)
        runs[name] = run_torchrun(2, HELPER, "--device", "cpu", *overrides, env=child_env(**env), check=True)
    assert "health: step 8: nonfinite" in runs["spiked"].stdout and "data steps 6-8" in runs["spiked"].stdout
    assert "health: no events" in runs["clean"].stdout
    final = "step_0000012" + ("" if strategy == "fsdp" else ".pt")
    a, b = (final_state(tmp_path / name / "ckpt" / final) for name in ("spiked", "clean"))
    for name in a:
        assert torch.equal(a[name], b[name]), name

"""Start-up sanity (utils/train/sanity.py): settings that make a run pointless are warned or refused in one
line each, before anything is written."""

import pytest

import train_single
from conftest import tiny_overrides
from models.config_checks import ConfigError
from models.config_loader import load_config
from utils.train.sanity import start_warnings

CASES = {
    "schedule.warmup_steps=100": "schedule.warmup_steps=100 is not shorter than train.max_steps=50",
    "eval.every=80": "eval.every=80 is longer than the run (train.max_steps=50): only the final evaluation runs",
    "checkpoint.every=60": "checkpoint.every=60 is longer than the run",
    "train.log_every=51": "train.log_every=51 is longer than the run",
    "model.context_length=2048": "model.context_length=2048 is longer than every validation shard",
    "train.max_steps=20000": "passes over the training split 200 times",
}
QUIET = ["train.max_steps=50", "schedule.warmup_steps=5", "eval.every=10", "checkpoint.every=10", "train.log_every=10"]


@pytest.mark.parametrize("override", CASES)
def test_each_pointless_setting_is_one_warning(override):
    """Each case alone gives exactly its warning; the quiet settings give none."""
    assert start_warnings(load_config(None, QUIET), [1000], 100) == []
    warnings = start_warnings(load_config(None, QUIET + [override]), [1000], 100)
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and CASES[override] in warnings[0], warnings


def test_stop_at_step_after_the_end_is_refused():
    with pytest.raises(ConfigError, match="train.stop_at_step=60 is after train.max_steps=50, so it is never reached"):
        start_warnings(load_config(None, QUIET + ["train.stop_at_step=60"]), [1000], 100)


def test_shipped_configs_start_without_warnings():
    """The quick start and the recipes are not pointless (their data's shard sizes as prepared by the README)."""
    for name, overrides, steps_per_epoch in (("cpu_quickstart", [], 102), ("shakespeare_cpu", [], 490),
                                             ("shakespeare_cpu", ["train.max_steps=730"], 490)):
        cfg = load_config(f"configs/{name}.yaml", overrides)
        assert start_warnings(cfg, [50_000], steps_per_epoch) == [], name


def test_warnings_come_before_anything_is_written_and_a_refusal_writes_nothing(tiny_data, tmp_path, capsys):
    """The warning is the first line of a run; a refused start leaves no checkpoint or log folder."""
    assert train_single.main(tiny_overrides(tiny_data, tmp_path / "warned", train__max_steps=2,
                                            schedule__warmup_steps=5, train__eval_every=0)) == 0
    assert capsys.readouterr().out.startswith("warning: schedule.warmup_steps=5 is not shorter than")
    refused = tmp_path / "refused"
    assert train_single.main(tiny_overrides(tiny_data, refused, train__stop_at_step=9)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.stop_at_step=9 is after train.max_steps=6" in err
    assert not refused.exists()

"""Config: YAML + dotted overrides, strict types, unknown keys, validation."""

import dataclasses
import re

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from conftest import ROOT, run_here
from models.config_checks import ConfigError
from models.config_loader import ELSEWHERE, MOVED, NOT_HERE, config_from_dict, config_to_dict, load_config, valid_keys
from utils.train.cli import parse_cli


def test_yaml_and_overrides_resolve_with_types(tmp_path):
    """Overrides beat the file and are converted to each field's type."""
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  dim: 64\ntrain:\n  lr: 1e-3\n  compile: false\n")
    cfg = load_config(f, ["train.max_steps=50", "model.n_heads=4", "optim.lr=2", "train.compile=true",
                          "eval.sample_prompt=hi there"])
    assert cfg.model.dim == 64 and cfg.model.n_heads == 4 and cfg.train.max_steps == 50
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)  # int promotes to float
    assert cfg.train.compile is True and cfg.eval.sample_prompt == "hi there"


def test_pyyaml_exponent_without_dot_is_a_float(tmp_path):
    """PyYAML reads 1e-3 as a string; the float field still gets 0.001."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-3\n")
    assert load_config(f).optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override, match", [
    ("train.lrr=1", r"unknown config key 'train.lrr' \(did you mean 'optim.lr'\?\)"),
    ("modle.dim=3", r"unknown config key 'modle.dim' \(did you mean 'model.dim'\?\)"),
    ("train.batch_size=2.5", "train.batch_size must be int"),
    ("train.compile=yes", "train.compile must be bool"),
    ("optim.lr=fast", "optim.lr must be a finite float"),
    ("model.n_heads=7", "must divide model.dim"),
    ("optim.lr=-1", "optim.lr must be positive"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("train.max_steps", "must look like section.key=value"),
])
def test_bad_overrides_raise_config_error(override, match):
    """Each bad override names the key and what is wrong."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_key_in_file_is_named(tmp_path):
    """An unknown key inside the YAML file is reported with a suggestion."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError, match="train.warmup_step.*did you mean 'schedule.warmup_steps'"):
        load_config(f)


def test_config_is_frozen_and_round_trips():
    """Configs are immutable and rebuild identically from their dict (as stored in checkpoints)."""
    cfg = load_config(ROOT / "configs" / "default_config.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_shipped_configs_load_with_the_seed_model():
    """Every config in configs/ loads; the default is the seed's model."""
    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(path)
    m = load_config(ROOT / "configs" / "default_config.yaml").model
    assert (m.dim, m.n_layers, m.n_heads, m.ffn_dim, m.vocab_size, m.context_length) == (256, 6, 8, 1024, 256, 512)


def test_parse_cli_splits_flags_and_overrides():
    """--config/--device/--resume are flags; the rest are overrides."""
    cfg, args = parse_cli(["--device", "cpu", "train.max_steps=7", "--resume", "auto"], "t")
    assert cfg.train.max_steps == 7 and args.device == "cpu" and args.resume == "auto"


def test_unknown_key_on_command_line_exits_cleanly(capfd):
    """The entry point prints one error line naming the key, exits 2, and shows no traceback."""
    proc = run_here(capfd, "train_single.py", "--config", ROOT / "configs/default_config.yaml", "train.lrr=1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'train.lrr' (did you mean 'optim.lr'?)"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_epochs_plan_the_run_instead_of_max_steps(tmp_path):
    """train.epochs replaces the file's max_steps (and a later max_steps replaces a file's epochs); the config
    then holds exactly one, so config.yaml written from it loads back."""
    cfg = load_config(ROOT / "configs" / "default_config.yaml", ["train.epochs=3"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (3, 0)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 2\n")
    assert (load_config(f).train.epochs, load_config(f).train.max_steps) == (2, 0)
    assert (load_config(f, ["train.max_steps=50"]).train.epochs, load_config(f, ["train.max_steps=50"]).train.max_steps) \
        == (0, 50)
    assert load_config(None, ["train.epochs=0"]).train.max_steps == 5000  # 0: max_steps plans it


@pytest.mark.parametrize("file, overrides, match", [
    ("", ["train.epochs=3", "train.max_steps=50"], r"^train.max_steps=50 and train.epochs=3 both set the run's "
                                                   r"length: keep one \(the other 0\)$"),
    ("train:\n  epochs: 3\n  max_steps: 50\n", [], "train.max_steps=50 and train.epochs=3 both set"),
    ("", ["train.max_steps=0"], "one of train.max_steps and train.epochs must be positive"),
    ("", ["train.epochs=-1"], r"train.epochs must be >= 0 \(got -1\)"),
    ("", ["train.epochs=1.5"], "train.epochs must be int"),
])
def test_epochs_and_max_steps_in_one_place_are_one_line(tmp_path, file, overrides, match):
    f = tmp_path / "c.yaml"
    f.write_text(file)
    with pytest.raises(ConfigError, match=match) as refused:
        load_config(f, overrides)
    assert "\n" not in str(refused.value)


LENGTH = st.one_of(st.none(), st.integers(0, 3))


@settings(max_examples=150, deadline=None)
@given(file=st.tuples(LENGTH, LENGTH), cli=st.tuples(LENGTH, LENGTH))
def test_the_last_place_to_give_the_run_length_wins(tmp_path_factory, file, cli):
    """(max_steps, epochs) in the file and on the command line, each absent or a value: a place that gives one
    non-zero clears the other beneath it; the config holds exactly one non-zero, or it is one line refusing."""
    f = tmp_path_factory.mktemp("cfg") / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {k: v for k, v in zip(("max_steps", "epochs"), file) if v is not None}}))
    overrides = [f"train.{k}={v}" for k, v in zip(("max_steps", "epochs"), cli) if v is not None]
    length, valid = [5000, 0], True
    for place in (file, cli):  # the file is checked on its own first, then with the command line over it
        for i in (0, 1):
            if place[i] is not None:
                length[i] = place[i]
            elif place[1 - i]:
                length[i] = 0
        valid = valid and bool(length[0]) != bool(length[1])
    try:
        t = load_config(f, overrides).train
    except ConfigError as e:
        assert "\n" not in str(e) and not valid, (file, cli, str(e))
        return
    assert [t.max_steps, t.epochs] == length and bool(t.max_steps) != bool(t.epochs)


@pytest.mark.parametrize("key, meant", [
    ("train.save_every", None),  # moved; still works
    ("train.lr", None),
    ("checkpoint.save_every", "did you mean 'checkpoint.every'?"),
    ("train.gradient_checkpointing", "did you mean 'train.activation_checkpointing'?"),
    ("data.num_workers", "no loader workers to set"),
    ("data.pin_memory", "on CUDA each batch already travels from pinned memory"),
    ("optim.batch_size", "did you mean 'train.batch_size'?"),
    ("train.num_epochs", "did you mean 'train.epochs'?"),
    ("train.eval_interval", "did you mean 'eval.every'?"),
    ("train.learning_rate", "did you mean 'optim.lr'?"),
    ("train.device", "pass --device"),
    ("train.dir", "did you mean 'checkpoint.dir' or 'data.dir' or 'logging.dir'?"),
])
def test_a_key_from_elsewhere_is_answered_with_the_one_here(key, meant):
    """The names a user of the seed's README or of another trainer types work, or name the key that does."""
    if meant is None:
        load_config(None, [f"{key}=3"])
        return
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{key}' (") + ".*" + re.escape(meant)):
        load_config(None, [f"{key}=3"])


@pytest.mark.parametrize("override, meant", [
    ("lr=0.1", "did you mean optim.lr=0.1?"), ("epochs=2", "did you mean train.epochs=2?"),
    ("learning_rate=1", "did you mean optim.lr=1?"), ("every=5", "did you mean checkpoint.every=5 or eval.every=5?"),
    ("bogus=1", "e.g. train.max_steps=50"),
])
def test_an_override_without_its_section_names_the_full_key(override, meant):
    with pytest.raises(ConfigError, match=re.escape(f"override '{override}' must look like section.key=value ({meant})")):
        load_config(None, [override])


def test_every_name_from_elsewhere_points_at_a_key_we_have():
    assert set(ELSEWHERE.values()) <= set(valid_keys())
    assert not (set(ELSEWHERE) | set(NOT_HERE)) & {k.rpartition(".")[2] for k in valid_keys() + list(MOVED)}


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(valid_keys() + list(MOVED)), section=st.one_of(
    st.sampled_from(["model", "data", "train", "optim", "schedule", "eval", "checkpoint", "logging", "paths"]),
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True)))
def test_a_key_of_ours_in_the_wrong_section_names_where_it_lives(key, section):
    """Any section with one of our key names: it loads (or its value is refused), or the hint names every key
    of that name we have, and only those."""
    name = key.rpartition(".")[2]
    try:
        load_config(None, [f"{section}.{name}=1"])
    except ConfigError as e:
        if "unknown config key" in str(e):
            named = re.findall(r"'([a-z_]+\.[a-z_0-9]+)'", str(e).split("(", 1)[1])
            ours = {MOVED.get(k, k) for k in valid_keys() + list(MOVED) if k.rpartition(".")[2] == name}
            assert set(named) == ours, str(e)

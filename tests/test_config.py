"""Config: YAML + dotted overrides, strict types, unknown keys, validation."""

import dataclasses

import pytest

from conftest import ROOT, run_script
from models.config_checks import ConfigError
from models.config_loader import config_from_dict, config_to_dict, load_config
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


def test_unknown_key_on_command_line_exits_cleanly(tmp_path):
    """The entry point prints one error line naming the key, exits 2, and shows no traceback."""
    proc = run_script("train_single.py", "--config", "configs/default_config.yaml", "train.lrr=1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'train.lrr' (did you mean 'optim.lr'?)"
    assert "Traceback" not in proc.stderr + proc.stdout

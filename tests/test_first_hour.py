"""What a new user meets first: the start-up summary, --print-config, run names, refusals that leave
nothing behind, and files with the usual permissions."""

from __future__ import annotations

import dataclasses
import os
import stat

import train_single
from conftest import ROOT, run_here, tiny_overrides
from models.config_loader import SECTIONS, config_to_yaml, load_config


def test_print_config_lists_every_key_with_type_value_and_doc(capfd):
    """--print-config documents every key straight from the dataclasses, with the values of the file and
    the overrides when given."""
    proc = run_here(capfd, "train_single.py", "--print-config")
    for section, cls in SECTIONS.items():
        assert f"{section}:\n" in proc.stdout
        for f in dataclasses.fields(cls):
            line = next(l for l in proc.stdout.splitlines() if l.startswith(f"  {f.name}: "))
            assert ")  # " in line, f"{section}.{f.name} has no meaning: {line!r}"
    assert "# peak learning rate" in proc.stdout and "  lr: 0.0003  (float)" in proc.stdout
    from_file = run_here(capfd, "train_single.py", "--print-config", "--config", ROOT / "configs/cpu_quickstart.yaml",
                         "optim.lr=0.0042").stdout
    quickstart = load_config(ROOT / "configs/cpu_quickstart.yaml")
    assert f"  max_steps: {quickstart.train.max_steps}  (int)" in from_file and "  lr: 0.0042  (float)" in from_file


def test_console_gets_a_summary_and_the_log_file_the_full_config(tiny_data, tmp_path, capfd):
    """Start-up prints a short summary; the resolved YAML goes to the log file and config.yaml only."""
    overrides = tiny_overrides(tiny_data, tmp_path, train__max_steps=2)
    proc = run_here(capfd, "train_single.py", "--config", ROOT / "configs/cpu_quickstart.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr
    for fragment in ("model: ", "data: ", "global batch: ", "precision: ", "checkpoints: "):
        assert any(l.startswith(fragment) for l in proc.stdout.splitlines()), fragment
    full = config_to_yaml(load_config(ROOT / "configs/cpu_quickstart.yaml", overrides)).rstrip()
    assert full not in proc.stdout
    (log,) = (tmp_path / "logs").glob("train_cpu_quickstart-*.log")  # named after the config file
    assert full in log.read_text() and "eta " in log.read_text()
    assert [p.name.split("-")[0] for p in (tmp_path / "logs/tensorboard").iterdir()] == ["cpu_quickstart"]
    assert (tmp_path / "ckpt/config.yaml").read_text().rstrip() == full


def test_refused_start_leaves_nothing_behind(capsys, tiny_data, tmp_path):
    """A resume refused for another model shape changes no file and creates no log or TensorBoard run."""
    assert train_single.main(tiny_overrides(tiny_data, tmp_path, train__max_steps=2)) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = train_single.main(["--resume", "auto", *tiny_overrides(tiny_data, tmp_path, model__dim=64)])
    assert code == 2 and "another model shape" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_outputs_have_the_usual_permissions(tiny_data, tmp_path):
    """Checkpoints and config.yaml are 0644 under a 022 umask, as any file a user creates."""
    old = os.umask(0o022)
    try:
        assert train_single.main(tiny_overrides(tiny_data, tmp_path, train__max_steps=1)) == 0
    finally:
        os.umask(old)
    for name in ("step_0000001.pt", "best_model.pt", "config.yaml"):
        assert stat.S_IMODE((tmp_path / "ckpt" / name).stat().st_mode) == 0o644, name

"""dev/ablate.py: variants trained per seed at one wall-clock budget and tabulated; bad input is one line
before any run."""

import json
import re

import pytest
import yaml

from conftest import run_script, tiny_overrides


@pytest.mark.slow
def test_ablate_prints_a_table_of_fixed_budget_runs(tiny_data, tmp_path):
    """dev/ablate.py times each variant, trains it per seed within the budget, and tabulates val losses."""
    config = tmp_path / "tiny.yaml"
    sections: dict[str, dict] = {}
    for key, value in (o.split("=", 1) for o in tiny_overrides(tiny_data, tmp_path)):
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    config.write_text(yaml.safe_dump(sections))
    proc = run_script("-m", "dev.ablate", "--config", config, "--budget", "0.2", "--seeds", "1", "2",
                      "--calibration-steps", "5", "--json", tmp_path / "runs.jsonl",
                      "--variant", "base", "--variant", "rope:model.pos_emb=rope train.max_steps=3", check=True)
    table = [l for l in proc.stdout.splitlines() if l.startswith("| ")]
    assert table[0].startswith("| variant |") and [l.split(" | ")[0] for l in table[1:]] == ["| base", "| rope"]
    assert table[1].endswith("| reference |") and re.search(r"\| [+-]\d\.\d{4}, p = \S+ \((helps|hurts|not shown)\) \|$",
                                                           table[2])
    runs = [json.loads(l) for l in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in runs] == [("base", 1), ("rope", 1), ("base", 2), ("rope", 2)]  # turns
    assert all(r["steps"] >= 1 and 0 < r["val_loss"] < 6 for r in runs)
    assert [r["steps"] for r in runs if r["variant"] == "rope"] == [3, 3]  # a variant's own max_steps is kept


@pytest.mark.parametrize("args, says", [
    (["--variant", "base", "--variant", "typo:model.dimm=64"], "variant 'typo': unknown config key 'model.dimm'"),
    (["--variant", "base", "--budget", "nan"], "argument --budget: must be a number above 0"),
])
def test_ablate_refuses_bad_input_in_one_line_before_any_run(tmp_path, args, says):
    """A bad variant or budget is one line and exit 2 before the first (long) training run starts."""
    proc = run_script("-m", "dev.ablate", "--config", "configs/cpu_quickstart.yaml", "--budget", "1", *args,
                      "--json", tmp_path / "runs.jsonl")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {says}") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert not (tmp_path / "runs.jsonl").exists()

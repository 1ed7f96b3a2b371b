"""Architecture options survive the round trip: training saves them, inference.py and the export read them."""

import os
import re

import pytest

import inference
from conftest import run_script, tiny_overrides
from scripts import export_hf
from utils.checkpoint.format import CONFIG, load_checkpoint

ARCHITECTURES = {
    "gpt2-like": {},
    "llama-like": {"model__pos_emb": "rope", "model__norm": "rmsnorm", "model__activation": "swiglu",
                   "model__bias": "false", "model__tie_embeddings": "false"},
    "qwen3-like": {"model__pos_emb": "rope", "model__norm": "rmsnorm", "model__activation": "swiglu",
                   "model__bias": "false", "model__qk_norm": "true"},
    "relu2-rope": {"model__pos_emb": "rope", "model__activation": "relu2", "model__zero_init_proj": "true"},
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_options_round_trip_through_inference_and_export(name, tiny_data, tmp_path, capsys):
    """The checkpoint records every option; inference.py rebuilds the same model; export maps it or refuses."""
    options = ARCHITECTURES[name]
    run = tmp_path / "run"
    run_script("train_single.py", *tiny_overrides(tiny_data, run, train__max_steps=2, eval__sample_tokens=0,
                                                  optim__name="muon", **options), check=True)
    saved = load_checkpoint(run / "ckpt/best_model.pt")[CONFIG]["model"]
    for key, value in options.items():
        assert str(saved[key.split("__")[1]]).lower() == str(value).lower()
    assert inference.main(["--checkpoint", str(run / "ckpt/best_model.pt"), "--prompt", "the", "--seed", "0",
                           "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("the")
    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("transformers")
    code = export_hf.main(["--checkpoint", str(run / "ckpt/best_model.pt"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    if name == "relu2-rope":  # no standard transformers class has ReLU² with RoPE and LayerNorm
        assert code == 2 and err.startswith("error: ") and "relu2" in err and not (tmp_path / "hf").exists()
    else:
        assert code == 0 and (tmp_path / "hf/model.safetensors").is_file()


@pytest.mark.slow
def test_ablate_prints_a_table_of_fixed_budget_runs(tiny_data, tmp_path):
    """scripts/ablate.py times each variant, trains it per seed within the budget, and tabulates val losses."""
    import json

    import yaml

    config = tmp_path / "tiny.yaml"
    sections: dict[str, dict] = {}
    for key, value in (o.split("=", 1) for o in tiny_overrides(tiny_data, tmp_path)):
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    config.write_text(yaml.safe_dump(sections))
    proc = run_script("-m", "scripts.ablate", "--config", config, "--budget", "0.2", "--seeds", "1", "2",
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
    (["--variant", "base", "--budget", "nan"], "--budget must be positive"),
])
def test_ablate_refuses_bad_input_in_one_line_before_any_run(tmp_path, args, says):
    """A bad variant or budget is one line and exit 2 before the first (long) training run starts."""
    proc = run_script("-m", "scripts.ablate", "--config", "configs/cpu_quickstart.yaml", "--budget", "1", *args,
                      "--json", tmp_path / "runs.jsonl")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {says}") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert not (tmp_path / "runs.jsonl").exists()

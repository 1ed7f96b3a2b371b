"""Architecture options survive the round trip: training saves them, inference.py and the export read them."""

import os

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


@pytest.mark.slow  # a real training run per architecture, ~20 s each; tests/test_export.py maps each in-process
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

"""dev/vs_nanogpt.py: bad input is one line; with a nanoGPT checkout in $NANOGPT, one real pair runs."""

import json
import os
from pathlib import Path

import pytest

from conftest import run_script, tiny_overrides
from dev.vs_nanogpt import main as vs_nanogpt_main


def test_a_folder_without_nanogpt_is_refused(capsys, tmp_path):
    assert vs_nanogpt_main(["--nanogpt", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a nanoGPT checkout" in err and err.count("\n") == 1, err


def test_a_model_nanogpt_cannot_express_is_refused(capsys, tmp_path):
    (tmp_path / "train.py").write_text("")
    (tmp_path / "configurator.py").write_text("")
    assert vs_nanogpt_main(["--nanogpt", str(tmp_path), "model.pos_emb=rope"]) == 2
    assert "nanoGPT's model is GPT-2's" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("NANOGPT"), reason="set NANOGPT to a nanoGPT checkout to run it")
def test_one_pair_against_nanogpt(tiny_data, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_data, tmp_path) if not o.startswith("model.ffn_dim")]
    proc = run_script("-m", "dev.vs_nanogpt", "--nanogpt", Path(os.environ["NANOGPT"]), "--rounds", "1", "--steps",
                      "3", "--warmup", "1", *overrides, "model.ffn_dim=128", timeout=300, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["median_ratio"] > 0 and len(summary["pairs"]) == 1 and "| **median** |" in proc.stdout

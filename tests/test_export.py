"""scripts/export_hf.py: the exported folder loads in transformers with no custom code and computes
our logits and greedy continuations; options no standard class expresses are refused."""

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local; never reach for the Hub
transformers = pytest.importorskip("transformers")

from conftest import ROOT, run_script  # noqa: E402
from models.config import Config, ModelConfig  # noqa: E402
from models.config_loader import config_to_dict, load_config  # noqa: E402
from models.transformer import GPT  # noqa: E402
from scripts import export_hf  # noqa: E402
from utils.checkpoint.format import CONFIG, FORMAT, FORMAT_VERSION, MODEL, save_checkpoint  # noqa: E402

SWIGLU = {"pos_emb": "rope", "norm": "rmsnorm", "activation": "swiglu"}
MAPPABLE = {
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2-no-bias-untied": ({"bias": False, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "llama": ({**SWIGLU, "bias": False, "rope_base": 500.0}, "LlamaForCausalLM"),
    "llama-bias-untied": ({**SWIGLU, "bias": True, "tie_embeddings": False}, "LlamaForCausalLM"),
    "qwen3": ({**SWIGLU, "qk_norm": True, "bias": False}, "Qwen3ForCausalLM"),
}


def checkpoint_of(path, **options) -> GPT:
    """A tiny model with every weight perturbed (so biases and norm gains are not their 0/1 init), saved."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=48, context_length=24, **options))
    model = GPT(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_checkpoint({MODEL: model.state_dict(), CONFIG: config_to_dict(cfg), FORMAT: FORMAT_VERSION}, path)
    return model


@pytest.mark.parametrize("name", MAPPABLE)
def test_exported_model_matches_ours(name, tmp_path):
    """AutoModelForCausalLM loads the folder (safetensors, stock class): same logits, same greedy text."""
    options, cls = MAPPABLE[name]
    ours = checkpoint_of(tmp_path / "model.pt", **options)
    assert export_hf.main(["--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf/model.safetensors").is_file()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == cls
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(x)[0], atol=1e-4, rtol=0)
    prompt = torch.tensor([list(b"Once")])
    greedy = torch.stack(list(ours.generate(prompt, 20, temperature=0)), 1)  # 24 tokens: within the context
    generated = theirs.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(generated[:, prompt.size(1):], greedy)


def test_exported_tokenizer_maps_text_to_its_bytes(tmp_path):
    """AutoTokenizer on the folder: the ids are the UTF-8 bytes, and decoding gives the text back."""
    checkpoint_of(tmp_path / "model.pt")
    assert export_hf.main(["--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "hf")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Once upon a time, 日本語 émigré\n\t\x00 🎉"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode())
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(list(range(256)))) == list(range(256))


@pytest.mark.parametrize("options, named", [
    ({"activation": "relu2"}, "model.activation=relu2"),
    ({"norm": "rmsnorm"}, "model.norm=rmsnorm"),
    ({"qk_norm": True}, "model.qk_norm=true"),
    ({"pos_emb": "rope"}, "model.norm=layernorm, model.activation=gelu"),
    ({**SWIGLU, "norm": "layernorm"}, "model.norm=layernorm"),
    ({**SWIGLU, "qk_norm": True, "bias": True}, "model.bias=true"),
])
def test_unsupported_options_are_refused(options, named, tmp_path, capsys):
    """No standard class computes these: one error line naming the option and what is supported, exit 2."""
    checkpoint_of(tmp_path / "model.pt", **options)
    code = export_hf.main(["--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert named in err and "GPT-2" in err and "Llama" in err, err
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.slow
def test_refusal_through_the_real_command(tmp_path):
    """python scripts/export_hf.py exits 2 with one line and no traceback; an existing folder is never overwritten."""
    checkpoint_of(tmp_path / "relu2.pt", activation="relu2")
    proc = run_script("-m", "scripts.export_hf", "--checkpoint", tmp_path / "relu2.pt", "--out", tmp_path / "hf")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "model.activation=relu2" in proc.stderr and not (tmp_path / "hf").exists()
    checkpoint_of(tmp_path / "gpt2.pt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/keep.txt").write_text("mine")
    proc = run_script("-m", "scripts.export_hf", "--checkpoint", tmp_path / "gpt2.pt", "--out", tmp_path / "taken")
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_an_export_that_differs_is_not_written(tmp_path, capsys, monkeypatch):
    """The folder is checked against our logits before it is named --out: a wrong weight leaves nothing behind."""
    checkpoint_of(tmp_path / "model.pt")
    mapping = export_hf.gpt2_weights

    def off_by_a_little(model):
        weights = mapping(model)
        return {**weights, "transformer.ln_f.bias": weights["transformer.ln_f.bias"] + 1e-2}

    monkeypatch.setattr(export_hf, "gpt2_weights", off_by_a_little)
    code = export_hf.main(["--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and "differs from the checkpoint" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.fixture(scope="module")
def quickstart_export(tmp_path_factory) -> Iterator[Path]:
    """A randomly initialised model of the quick start's shape (GPT-2, learned positions, context 128),
    exported as hf_model under a default umask. One torch thread while it is in use: on a shared
    2-core machine more threads make generation several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("quickstart")
    torch.manual_seed(0)
    cfg = Config(model=load_config(ROOT / "configs/cpu_quickstart.yaml").model)
    save_checkpoint({MODEL: GPT(cfg.model).state_dict(), CONFIG: config_to_dict(cfg), FORMAT: FORMAT_VERSION},
                    folder / "model.pt")
    umask = os.umask(0o022)
    try:
        assert export_hf.main(["--checkpoint", str(folder / "model.pt"), "--out", str(folder / "hf_model")]) == 0
    finally:
        os.umask(umask)
    yield folder
    torch.set_num_threads(threads)


def readme_hf_snippet() -> str:
    """The README's ```python block that follows the export command."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"python -m scripts\.export_hf[^\n]*\n```\n```python\n(.*?)```", readme, re.S)
    assert found, "README: the export command is no longer followed by its ```python snippet"
    return found.group(1)


def test_readme_snippet_runs_verbatim(quickstart_export, monkeypatch, capsys):
    """The README's snippet, as written, on the quick-start model: stock defaults stay within the position table."""
    monkeypatch.chdir(quickstart_export)
    exec(compile(readme_hf_snippet(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("Once upon a time") >= 3 and "ROMEO:" in printed, printed


def test_batched_pipeline_matches_one_at_a_time(quickstart_export):
    """Prompts of different lengths in one batch (left-padded with byte 0) continue as they do alone."""
    generator = transformers.pipeline("text-generation", model=str(quickstart_export / "hf_model"))
    prompts = ["Once upon a time", "To be", "ROMEO:\nWhat light"]
    batched = generator(prompts, batch_size=3, do_sample=False, max_new_tokens=8)
    alone = [generator(p, do_sample=False, max_new_tokens=8) for p in prompts]
    assert batched == alone
    assert all(out[0]["generated_text"].startswith(p) for out, p in zip(batched, prompts))
    full = generator("x", do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert len(full) == 128  # the stock max_length: the whole context, and no further


def test_export_carries_context_and_padding(quickstart_export):
    """generation_config and tokenizer know the context length and the pad byte; no bos/eos."""
    folder = quickstart_export / "hf_model"
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert (gen.max_length, gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (128, 0, None, None)
    assert transformers.AutoConfig.from_pretrained(folder).pad_token_id == 0
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (tok.model_max_length, tok.pad_token_id, tok.padding_side) == (128, 0, "left")
    assert tok.bos_token is None and tok.eos_token is None
    assert tok("\u0100")["input_ids"] == [0xC4, 0x80]  # the pad token's stand-in character is just text
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"] == [[0, 0, 97, 98], [97, 98, 99, 100]]
    assert batch["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_export_has_the_usual_permissions(quickstart_export):
    """Under umask 022 the folder is 0755 and every file 0644, as any other file the user writes."""
    folder = quickstart_export / "hf_model"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= modes.keys()

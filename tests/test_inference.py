"""Generation and inference.py: KV cache vs recompute, sampling filters, seeds, stop strings,
UTF-8 streaming, and checkpoints from DDP and compiled runs."""

import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import child_env, make_dataset, run_script, run_torchrun, tiny_overrides
from utils.text import unescape
from utils.generation import TextStream, generate_text
from utils.checkpoint.format import CONFIG, MODEL, build_model
from utils.checkpoint.reader import load_model
from models.config import ModelConfig
from models.config_loader import config_to_dict, load_config
from models.transformer import GPT, filter_logits, sample_next

LEARNED = {}
ROPE = {"pos_emb": "rope", "norm": "rmsnorm", "activation": "swiglu", "qk_norm": True}


def tiny(context_length: int = 16, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, context_length=context_length, **kw)
    return GPT(cfg).eval()


def greedy_by_hand(model: GPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The reference within one context: a full forward over the whole sequence for every token."""
    idx = prompt
    for _ in range(n):
        idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, prompt.size(1):]


@pytest.mark.parametrize("options", [LEARNED, ROPE], ids=["learned", "rope"])
def test_cached_greedy_equals_full_recompute_within_the_context(options):
    """Prefill + one cached token per step gives exactly the tokens of a full forward per step."""
    model = tiny(**options)
    prompt = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(1))
    cached = torch.stack(list(model.generate(prompt, 11, temperature=0)), 1)
    assert torch.equal(cached, greedy_by_hand(model, prompt, 11))


@pytest.mark.parametrize("options", [LEARNED, ROPE], ids=["learned", "rope"])
@pytest.mark.parametrize("context_length, prompt_len", [(16, 3), (16, 40), (1, 2), (5, 5)])
def test_cached_greedy_equals_recompute_past_the_context(options, context_length, prompt_len):
    """Crossing or starting beyond context_length, the cache slides like the recomputing reference."""
    model = tiny(context_length, **options)
    prompt = torch.randint(0, 256, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    cached = torch.stack(list(model.generate(prompt, 3 * context_length + 7, temperature=0)), 1)
    full = torch.stack(list(model.generate(prompt, 3 * context_length + 7, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, full)


def test_top_k_one_is_greedy():
    """top_k=1 samples the argmax, at any temperature, both directly and through generate."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 256, generator=g)
    for temperature in (0.5, 1.0, 3.0):
        assert torch.equal(sample_next(logits, temperature, top_k=1, generator=g), logits.argmax(-1))
    model = tiny()
    prompt = torch.tensor([[1, 2, 3]])
    sampled = torch.stack(list(model.generate(prompt, 30, temperature=1.5, top_k=1, generator=g)), 1)
    assert torch.equal(sampled, torch.stack(list(model.generate(prompt, 30, temperature=0)), 1))


def test_top_p_keeps_only_the_nucleus():
    """Tokens outside the smallest set with mass >= top_p are never drawn; those inside are."""
    probs = torch.tensor([0.05, 0.5, 0.01, 0.3, 0.1, 0.04])  # sorted: 0.5, 0.3 | 0.1, 0.05, 0.04, 0.01
    logits = probs.log().repeat(4000, 1)
    filtered = filter_logits(logits[:1], 1.0, None, 0.7)
    assert torch.isfinite(filtered[0]).tolist() == [False, True, False, True, False, False]
    draws = sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised within the nucleus
    assert set(sample_next(logits, 1.0, top_p=0.45, generator=torch.Generator().manual_seed(0)).tolist()) == {1}
    assert set(sample_next(logits, 1.0, top_k=3, top_p=0.99, generator=torch.Generator().manual_seed(0)).tolist()) \
        == {1, 3, 4}


@settings(max_examples=60, deadline=None)
@given(temperature=st.floats(min_value=0, allow_infinity=False),
       top_p=st.none() | st.floats(min_value=0, max_value=1, exclude_min=True),
       top_k=st.none() | st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_sampling_draws_a_token_at_any_accepted_setting(temperature, top_p, top_k, scale):
    """Any temperature >= 0 and top-p in (0, 1] the CLI accepts draws a token; a temperature too
    small to divide by reaches greedy, its limit, instead of NaN probabilities."""
    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * scale
    tokens = sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(1))
    assert tokens.shape == (4,) and ((tokens >= 0) & (tokens < 256)).all()
    if 0 < temperature < 1e-30:
        assert torch.equal(tokens, logits.argmax(-1))


def test_text_stream_never_prints_a_broken_character():
    """Bytes pushed one at a time, split inside multi-byte characters, come out as exactly the text."""
    text = "héllo, 日本語 — 🎉 done"
    stream = TextStream([])
    chunks = [stream.push(bytes([b])) for b in text.encode()] + [stream.push(b"", final=True)]
    assert "".join(chunks) == text == stream.text
    first = text.encode().index("日".encode())
    assert chunks[first:first + 3] == ["", "", "日"]  # its first two bytes are held, not printed
    assert stream.tokens == len(text.encode())


def test_text_stream_replaces_invalid_bytes():
    """Invalid bytes and a truncated sequence become U+FFFD; a character cut by the end is replaced too."""
    stream = TextStream([])
    out = "".join(stream.push(bytes([b])) for b in b"a\xffb\xe6\x97c\xe6\x97") + stream.push(b"", final=True)
    assert out == "a\ufffdb\ufffdc\ufffd"


def test_text_stream_ends_before_a_stop_string():
    """A stop string, even one split inside a multi-byte character, ends the text right before it."""
    stream = TextStream(["日本", "\n\n"], prompt="héllo ".encode())
    data = "say 日本 and more".encode()
    chunks = [stream.push(bytes([b])) for b in data] + [stream.push(b"", final=True)]
    assert stream.echo == "héllo " and "".join(chunks) == stream.text == "say "
    assert stream.done and stream.tokens == len("say 日本".encode())  # counted up to the stop, not past it


def test_stop_strings_take_backslash_escapes():
    """--stop "\\n\\n" means two newlines; other characters, non-ASCII included, stay as typed."""
    assert unescape("\\n\\n") == "\n\n"
    assert unescape("日本\\té") == "日本\té"
    assert unescape("a\\\\b") == "a\\b"


def test_generate_text_streams_what_it_returns():
    """What generate_text writes is the prompt then sample 0's text; the token count is what was generated."""
    model = tiny()
    written: list[str] = []
    texts, n = generate_text(model, "naïve ".encode(), 40, temperature=1.0, num_samples=3, seed=5,
                             write=written.append)
    assert "".join(written) == "naïve " + texts[0]
    assert n == 3 * 40 and len(set(texts)) == 3  # three different samples drawn as one batch
    again, _ = generate_text(model, "naïve ".encode(), 40, temperature=1.0, num_samples=3, seed=5)
    assert again == texts


@pytest.fixture(scope="module")
def ddp_checkpoint(tmp_path_factory):
    """The best_model.pt of a 2-rank DDP run (torchrun, gloo, CPU)."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_dataset(tmp / "data")
    run_torchrun(2, "train_ddp.py", "--device", "cpu", *tiny_overrides(data, tmp / "run"), check=True)
    return tmp / "run/ckpt/best_model.pt"


def infer(checkpoint, *args: str):
    return run_script("inference.py", "--checkpoint", checkpoint, *args, check=True)


def summary_tokens(stderr: str) -> int:
    return int(re.search(r"\[(\d+) tokens", stderr).group(1))


def assert_clean_keys(checkpoint) -> None:
    keys = list(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    assert keys and not [k for k in keys if k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k]


@pytest.mark.slow
def test_ddp_checkpoint_loads_and_same_seed_gives_same_text(ddp_checkpoint):
    """A DDP checkpoint has plain keys and loads in inference.py; a seed fixes the text, another changes it."""
    assert_clean_keys(ddp_checkpoint)
    a = infer(ddp_checkpoint, "--prompt", "the quick", "--max-new-tokens", "40", "--seed", "7", "--top-k", "50")
    b = infer(ddp_checkpoint, "--prompt", "the quick", "--max-new-tokens", "40", "--seed", "7", "--top-k", "50")
    c = infer(ddp_checkpoint, "--prompt", "the quick", "--max-new-tokens", "40", "--seed", "8", "--top-k", "50")
    assert a.stdout == b.stdout != c.stdout and a.stdout.startswith("the quick")
    assert summary_tokens(a.stderr) == 40 and "tokens/s" in a.stderr


@pytest.mark.slow
def test_stop_string_ends_the_output(ddp_checkpoint):
    """--stop cuts the streamed text right before the stop string and the summary counts only what was made."""
    sampling = ("--prompt", "the", "--max-new-tokens", "60", "--temperature", "1", "--seed", "3")
    continuation = infer(ddp_checkpoint, *sampling).stdout[len("the"):-1]  # the output ends with one newline
    # a printable stop string that is no backslash escape, from the middle of the text
    stop = next(w for w in (continuation[i:i + 4] for i in range(20, 55)) if w.isprintable() and "\\" not in w)
    cut = infer(ddp_checkpoint, *sampling, "--stop", stop)
    assert cut.stdout == "the" + continuation[:continuation.index(stop)] + "\n"
    assert summary_tokens(cut.stderr) < 60


@pytest.mark.slow
def test_prompt_from_stdin_and_file_and_samples_batch(ddp_checkpoint, tmp_path):
    """--prompt - reads stdin, --prompt-file reads a file, --num-samples prints each sample."""
    piped = run_script("inference.py", "--checkpoint", ddp_checkpoint, "--prompt", "-", "--max-new-tokens", "5",
                       "--temperature", "0", input="ünï\n", check=True)
    (tmp_path / "p.txt").write_text("ünï\n", encoding="utf-8")
    filed = infer(ddp_checkpoint, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", "5", "--temperature", "0")
    assert piped.stdout == filed.stdout and piped.stdout.startswith("ünï\n")
    many = infer(ddp_checkpoint, "--prompt", "ab", "--max-new-tokens", "5", "--num-samples", "3", "--seed", "1")
    assert many.stdout.count("--- sample ") == 3 and summary_tokens(many.stderr) == 15


@pytest.mark.slow
def test_compiled_run_checkpoint_loads(tmp_path, tiny_data):
    """train.compile=true (inductor on CPU) saves plain keys that inference.py loads."""
    proc = run_script("train_single.py", "--device", "cpu",
                      *tiny_overrides(tiny_data, tmp_path / "run", model__n_layers=1, train__compile="true",
                                      train__max_steps=2, eval__every=0, checkpoint__every=0,
                                      eval__sample_tokens=0), check=True,
                      env=child_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")))  # no stale shared cache
    assert "torch.compile failed" not in proc.stdout + proc.stderr  # it really trained compiled
    checkpoint = tmp_path / "run/ckpt/best_model.pt"
    assert_clean_keys(checkpoint)
    out = infer(checkpoint, "--prompt", "the", "--max-new-tokens", "10", "--seed", "0")
    assert out.stdout.startswith("the") and summary_tokens(out.stderr) == 10
    assert load_model(checkpoint, torch.device("cpu")).cfg.n_layers == 1


def test_bf16_inference_keeps_the_rope_tables_fp32():
    """A checkpoint loaded for bf16 sampling casts its weights, not the RoPE tables (training keeps them fp32):
    its logits and greedy tokens are exactly those of the same bf16 weights with the fp32 tables."""
    model = tiny(64, **ROPE)
    shape = dict(dim=32, n_layers=2, n_heads=4, ffn_dim=64, context_length=64, **ROPE)
    cfg = load_config(None, [f"model.{k}={v}" for k, v in shape.items()])
    loaded = build_model({CONFIG: config_to_dict(cfg), MODEL: model.state_dict()}, "tiny", torch.device("cpu"),
                         torch.bfloat16)
    assert loaded.rope_cos.dtype == loaded.rope_sin.dtype == torch.float32
    assert loaded.tok_emb.weight.dtype == torch.bfloat16
    reference = tiny(64, **ROPE).to(torch.bfloat16)
    reference.rope_cos, reference.rope_sin = model.rope_cos, model.rope_sin  # the fp32 tables
    prompt = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(prompt)[0], reference(prompt)[0])
    tokens = torch.stack(list(loaded.generate(prompt, 40, temperature=0)), 1)
    assert torch.equal(tokens, torch.stack(list(reference.generate(prompt, 40, temperature=0)), 1))

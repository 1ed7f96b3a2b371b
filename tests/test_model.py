"""The model: causality, KV cache, weight tying, parameter count, options."""

import pytest
import torch

from models.config import ModelConfig
from models.transformer import GPT

OPTIONS = [
    {},
    {"pos_emb": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False},
    {"qk_norm": True, "activation": "relu2", "tie_embeddings": False},
]


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"dim": 32, "n_layers": 2, "n_heads": 4, "ffn_dim": 64, "context_length": 16, **kw})
    return GPT(cfg).eval()


@pytest.mark.parametrize("options", OPTIONS)
def test_changing_a_token_leaves_earlier_logits_unchanged(options):
    """Causality: logits before position t do not depend on token t or later."""
    model = tiny(**options)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 256
    a, _ = model(x)
    b, _ = model(y)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9], b[:, 9])


@pytest.mark.parametrize("options", OPTIONS)
def test_kv_cache_generation_equals_recompute(options):
    """Greedy decoding with the cache gives the same tokens as recomputing the window each step."""
    model = tiny(**options)
    for prompt_len in (3, 20):  # shorter than and past the 16-token context
        prompt = torch.randint(0, 256, (2, prompt_len))
        cached = torch.stack(list(model.generate(prompt, 30, temperature=0)), 1)
        full = torch.stack(list(model.generate(prompt, 30, temperature=0, use_cache=False)), 1)
        assert torch.equal(cached, full)


def test_head_is_tied_and_params_counted_once():
    """The LM head shares the embedding; num_params counts it once."""
    model = tiny()
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    untied = tiny(tie_embeddings=False)
    assert untied.num_params() == model.num_params() + 256 * 32


def test_initial_weights_depend_on_the_seed_and_the_name_alone():
    """Each parameter starts from (seed, its name): not torch's global generator, not the other parameters
    (a tied head is initialised once, as the embedding); GPT-2's distributions."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, context_length=16, qk_norm=True)
    torch.manual_seed(1)
    model = GPT(cfg, seed=5)
    torch.manual_seed(2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), GPT(cfg, seed=5).parameters()))
    untied = GPT(ModelConfig(**{**cfg.__dict__, "tie_embeddings": False}), seed=5)
    assert torch.equal(untied.tok_emb.weight, model.tok_emb.weight)
    assert not torch.equal(untied.lm_head.weight, untied.tok_emb.weight)
    assert not torch.equal(GPT(cfg, seed=6).tok_emb.weight, model.tok_emb.weight)
    block = model.blocks[1]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)  # 1 / sqrt(2 * n_layers)
    assert torch.equal(block.norm1.weight, torch.ones(64)) and torch.equal(block.attn.k_norm.weight, torch.ones(16))
    assert not block.mlp.fc.bias.any() and not block.norm1.bias.any()
    zero = GPT(ModelConfig(**{**cfg.__dict__, "zero_init_proj": True}), seed=5)
    assert not zero.blocks[0].attn.proj.weight.any() and torch.equal(zero.blocks[0].attn.qkv.weight,
                                                                      model.blocks[0].attn.qkv.weight)


def test_loss_is_cross_entropy_and_ignores_minus_one():
    """forward returns (B, T, vocab) logits and the mean loss over targets that are not -1."""
    model = tiny()
    x = torch.randint(0, 256, (2, 8))
    t = torch.randint(0, 256, (2, 8))
    t[0, :4] = -1
    logits, loss = model(x, t)
    assert logits.shape == (2, 8, 256)
    keep = t != -1
    expected = torch.nn.functional.cross_entropy(logits[keep], t[keep])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_initial_loss_is_near_uniform():
    """GPT-2 init starts close to ln(256), the loss of a uniform guess."""
    model = tiny()
    x = torch.randint(0, 256, (4, 16))
    _, loss = model(x, torch.randint(0, 256, (4, 16)))
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.3


def test_too_long_input_is_rejected():
    """More tokens than context_length is an error, not silent garbage."""
    with pytest.raises(ValueError, match="exceeds context_length"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS)
def test_bf16_autocast_trains_without_warnings(options, param_dtype):
    """Every option runs forward and backward under CPU bf16 autocast with no dtype-mismatch warning, with fp32
    weights and with bf16 ones as FSDP gathers them (QK-norm once fed bf16 queries to fp32 RMSNorm gains, then
    fp32 queries to bf16 gains: torch warned and fell back to its unfused kernel)."""
    import warnings

    model = tiny(**{**options, "norm": "rmsnorm", "qk_norm": True}).train().to(param_dtype)
    x = torch.randint(0, 256, (2, 16))
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns of the mismatch once per process: this test must see it every time
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
    finally:
        torch.set_warn_always(warn_always)


def test_rope_tables_are_fp32_whatever_the_default_dtype():
    """Built under a bf16 default dtype (as the planner builds FSDP's bf16 gathers), the RoPE tables stay
    the fp32 the real model computes; bf16 tables once made the planner count less than a real forward saves."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = GPT(ModelConfig(context_length=16, dim=32, n_layers=1, n_heads=2, ffn_dim=48, pos_emb="rope"))
    finally:
        torch.set_default_dtype(default)
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32

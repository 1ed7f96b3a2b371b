"""Export a checkpoint to a Hugging Face folder that transformers loads with no custom code.

    python -m scripts.export_hf --checkpoint checkpoints/best_model.pt --out hf_model

Our options map onto the standard architecture that computes the same function:
    pos_emb=learned, norm=layernorm, activation=gelu          -> GPT-2 (GPT2LMHeadModel)
    pos_emb=rope, norm=rmsnorm, activation=swiglu             -> Llama (LlamaForCausalLM)
    ... the same with qk_norm=true and bias=false             -> Qwen3 (Qwen3ForCausalLM)
Any other combination is refused (exit 2) instead of becoming a silently different model. The
folder is written beside --out, loaded back with transformers and its logits compared with ours
before it takes the name --out. Weights are model.safetensors (fp32). Tokens are the 256 byte
values; a byte-level tokenizer is saved too. The README's "Hugging Face export" section shows
generate() and pipeline("text-generation") on the folder with their stock defaults: generation stops
at max_length = context_length tokens (generation_config.json), and batches are padded on the left
with byte 0 (NUL), since the 256 byte ids leave no spare one. There is no bos or eos token.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from utils.checkpoint.reader import load_model
from models.config import ModelConfig
from utils.errors import ArgumentParser, UserError, run_cli, utf8_text
from utils.outputs import check_output
from models.transformer import GPT
from utils.progress import progress
from utils.device import DEVICE_CHOICES, resolve_device

# Text never contains NUL, and the attention mask hides padding anyway, so byte 0 can pad without a
# 257th id (which would change the embedding shape and the logits we check against).
PAD = 0
SUPPORTED = ("pos_emb=learned + norm=layernorm + activation=gelu (GPT-2), "
             "pos_emb=rope + norm=rmsnorm + activation=swiglu (Llama; with qk_norm=true and bias=false: Qwen3)")


class ExportError(UserError):
    """The model has no standard Hugging Face equivalent, or the export does not reproduce it."""


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def architecture(cfg: ModelConfig) -> str:
    """'gpt2', 'llama' or 'qwen3': the standard class that computes exactly what our model does."""
    if cfg.pos_emb == "learned":
        arch, needed = "gpt2", {"norm": "layernorm", "activation": "gelu", "qk_norm": False}
    elif cfg.qk_norm:  # Qwen3's MLP has no biases
        arch, needed = "qwen3", {"norm": "rmsnorm", "activation": "swiglu", "bias": False}
    else:
        arch, needed = "llama", {"norm": "rmsnorm", "activation": "swiglu"}
    wrong = [f"model.{k}={_show(getattr(cfg, k))}" for k, v in needed.items() if getattr(cfg, k) != v]
    if wrong:
        raise ExportError(f"no standard Hugging Face architecture computes {', '.join(wrong)} with "
                          f"model.pos_emb={cfg.pos_emb}; exportable: {SUPPORTED}")
    return arch


def gpt2_weights(model: GPT) -> dict[str, Tensor]:
    """GPT-2 names; its Conv1D stores weights as (in, out), and it always has biases (zeros if we have none)."""
    def bias(layer: torch.nn.Module, n: int) -> Tensor:
        return layer.bias if layer.bias is not None else torch.zeros(n)

    sd = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
          "transformer.ln_f.weight": model.norm_f.weight, "transformer.ln_f.bias": bias(model.norm_f, model.cfg.dim),
          "lm_head.weight": model.lm_head.weight}
    for i, b in enumerate(model.blocks):
        for ours, theirs in ((b.norm1, "ln_1"), (b.norm2, "ln_2")):
            sd[f"transformer.h.{i}.{theirs}.weight"] = ours.weight
            sd[f"transformer.h.{i}.{theirs}.bias"] = bias(ours, model.cfg.dim)
        for ours, theirs in ((b.attn.qkv, "attn.c_attn"), (b.attn.proj, "attn.c_proj"), (b.mlp.fc, "mlp.c_fc"),
                             (b.mlp.proj, "mlp.c_proj")):
            sd[f"transformer.h.{i}.{theirs}.weight"] = ours.weight.t()
            sd[f"transformer.h.{i}.{theirs}.bias"] = bias(ours, ours.out_features)
    return sd


def llama_weights(model: GPT) -> dict[str, Tensor]:
    """Llama/Qwen3 names: qkv splits into q, k, v; the SwiGLU fc is [gate; up] stacked by rows."""
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm_f.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = b.norm1.weight
        sd[f"{p}.post_attention_layernorm.weight"] = b.norm2.weight
        if b.attn.q_norm is not None:
            sd[f"{p}.self_attn.q_norm.weight"] = b.attn.q_norm.weight
            sd[f"{p}.self_attn.k_norm.weight"] = b.attn.k_norm.weight
        pieces = {"self_attn.o_proj": (b.attn.proj, None), "mlp.down_proj": (b.mlp.proj, None)}
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            pieces[f"self_attn.{name}"] = (b.attn.qkv, (j, 3))
        for j, name in enumerate(("gate_proj", "up_proj")):
            pieces[f"mlp.{name}"] = (b.mlp.fc, (j, 2))
        for name, (layer, part) in pieces.items():
            for kind in ("weight", "bias"):
                t = getattr(layer, kind)
                if t is not None:
                    sd[f"{p}.{name}.{kind}"] = t if part is None else t.chunk(part[1], dim=0)[part[0]]
    return sd


def hf_model(model: GPT) -> torch.nn.Module:
    """The transformers model holding our weights (strict load: every name and shape must match)."""
    cfg = model.cfg
    arch = architecture(cfg)
    try:
        import transformers
    except ImportError:
        raise ExportError("the export needs transformers: pip install transformers safetensors") from None
    transformers.utils.logging.disable_progress_bar()
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None,
                  eos_token_id=None, pad_token_id=PAD)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_positions=cfg.context_length, n_embd=cfg.dim, n_layer=cfg.n_layers,
                                         n_head=cfg.n_heads, n_inner=cfg.ffn_dim, activation_function="gelu",
                                         layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         **common)
        cls, weights = transformers.GPT2LMHeadModel, gpt2_weights(model)
    else:
        if arch == "qwen3" and not hasattr(transformers, "Qwen3ForCausalLM"):
            raise ExportError(f"model.qk_norm=true exports as Qwen3, which needs transformers >= 4.51 "
                              f"(installed: {transformers.__version__})")
        llama = dict(hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                     num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                     head_dim=cfg.dim // cfg.n_heads, hidden_act="silu", max_position_embeddings=cfg.context_length,
                     rms_norm_eps=1e-5, rope_theta=cfg.rope_base, attention_bias=cfg.bias, **common)
        if arch == "qwen3":
            config = transformers.Qwen3Config(use_sliding_window=False, **llama)
            cls = transformers.Qwen3ForCausalLM
        else:
            config, cls = transformers.LlamaConfig(mlp_bias=cfg.bias, **llama), transformers.LlamaForCausalLM
        weights = llama_weights(model)
    hf = cls(config)
    # generate() and pipeline() default to 20 (or 256 new) tokens; GPT-2's position table ends at context_length
    hf.generation_config.max_length = cfg.context_length
    hf.generation_config.pad_token_id = PAD
    hf.load_state_dict({k: v.detach().float().contiguous() for k, v in weights.items()}, strict=True)
    return hf.eval()


def byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (its encoder.py bytes_to_unicode), as tokenizers' ByteLevel uses."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def save_byte_tokenizer(out: Path, context_length: int) -> None:
    """A tokenizer whose ids are the UTF-8 bytes (no merges; byte 0 doubles as the pad token), for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # split_special_tokens: the pad token's stand-in character (U+0100) in a text is its two UTF-8 bytes, not id 0.
    # Left padding, so a batch's new tokens all follow their prompts; no clean-up, so decoding gives the bytes back.
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=byte_to_char()[PAD], padding_side="left",
                            model_max_length=context_length, split_special_tokens=True,
                            clean_up_tokenization_spaces=False).save_pretrained(str(out))
    # transformers 5 names the class TokenizersBackend, which 4.x does not know; both know this alias
    patch_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")


def patch_json(path: Path, **values: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=2) + "\n")


def usual_permissions(folder: Path) -> None:
    """What a plain open() and mkdir() would give under the user's umask (save_pretrained in
    transformers 5 leaves model.safetensors at 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


@torch.no_grad()
def logit_error(model: GPT, folder: Path) -> float:
    """Largest |logit difference| between our model and the folder loaded fresh, on random bytes,
    relative to the size of our logits (at least 1)."""
    from transformers import AutoModelForCausalLM

    device = model.tok_emb.weight.device
    theirs = AutoModelForCausalLM.from_pretrained(str(folder)).to(device).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, min(model.cfg.context_length, 64)),
                      generator=torch.Generator().manual_seed(0)).to(device)
    ours = model(x)[0].float()
    return ((theirs(input_ids=x).logits.float() - ours).abs().max() / ours.abs().max().clamp(min=1.0)).item()


def export(checkpoint: str | Path, out: Path, rtol: float = 1e-4, device: torch.device = torch.device("cpu")) -> str:
    """Write the folder; returns the transformers class name. Nothing lands at out unless the logits match."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; choose another --out (nothing was overwritten)")
    bar = progress(4, "export", unit="stage")  # load, convert, save, check: each can take minutes on a big model
    model = load_model(checkpoint, device)
    bar.update()
    hf = hf_model(model)
    bar.update()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # beside out, so the final rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ExportError(f"cannot create --out {out}: {e.strerror}; choose a folder you can write") from None
    try:
        hf.save_pretrained(str(tmp))  # safetensors
        if model.cfg.pos_emb == "rope":  # transformers 5 writes only rope_parameters; 4.x would default to 10000
            patch_json(tmp / "config.json", rope_theta=model.cfg.rope_base)
        if model.cfg.vocab_size >= 256:
            save_byte_tokenizer(tmp, model.cfg.context_length)
        bar.update()
        error = logit_error(model, tmp)
        bar.update()
        bar.close()
        if error > rtol:
            raise ExportError(f"the exported {type(hf).__name__} differs from the checkpoint (relative logit error "
                              f"{error:.1e}); nothing was written. Please report this with the model config")
        usual_permissions(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return type(hf).__name__


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description="Export a checkpoint as a Hugging Face transformers model folder.")
    p.add_argument("--checkpoint", type=utf8_text, default="checkpoints/best_model.pt")
    p.add_argument("--out", type=utf8_text, required=True, help="folder to create (must not exist, or be empty)")
    p.add_argument("--device", default="auto", help=f"where the logit check runs: {DEVICE_CHOICES} (default auto)")

    def body() -> int:
        args = p.parse_args(argv)
        check_output(args.out, [args.checkpoint])
        name = export(args.checkpoint, Path(args.out), device=resolve_device(args.device))
        print(f"wrote {args.out} ({name}); load it with transformers.AutoModelForCausalLM.from_pretrained")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

"""The whole config schema: typed, frozen sections loaded from YAML plus dotted overrides.

No torch import here, so loading and validating a config is fast and cheap to test.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml


class UserError(Exception):
    """Bad input from the user: the entry points print it as one line, no traceback."""


class ConfigError(UserError):
    """The config file, a key or a value is wrong."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(choices)} (got '{value}')")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    """byte-level: 256 covers every UTF-8 byte"""
    context_length: int = 512
    """tokens the model attends over"""
    dim: int = 256
    """residual stream width"""
    n_layers: int = 6
    n_heads: int = 8
    """attention heads; must divide dim"""
    ffn_dim: int = 1024
    """hidden width of the MLP (for swiglu, the width of each of its two branches)"""
    dropout: float = 0.0
    pos_emb: str = "learned"
    """learned (GPT-2) or rope (rotary, Su et al. 2021)"""
    norm: str = "layernorm"
    """layernorm or rmsnorm"""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before attention"""
    activation: str = "gelu"
    """gelu, relu2 (squared ReLU) or swiglu"""
    bias: bool = True
    """biases in linear layers and norms"""
    tie_embeddings: bool = True
    """share the token embedding with the LM head"""
    zero_init_proj: bool = False
    """start residual output projections at zero instead of GPT-2's scaled init"""
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "dim", "n_layers", "n_heads", "ffn_dim"):
            _check(getattr(self, name) > 0, f"model.{name} must be positive (got {getattr(self, name)})")
        _check(self.dim % self.n_heads == 0,
               f"model.n_heads={self.n_heads} must divide model.dim={self.dim}; "
               f"pick n_heads from {[h for h in range(1, 33) if self.dim % h == 0]}")
        _check(self.pos_emb != "rope" or (self.dim // self.n_heads) % 2 == 0,
               "model.pos_emb=rope needs an even head size (dim / n_heads)")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1) (got {self.dropout})")
        _one_of("model.pos_emb", self.pos_emb, ("learned", "rope"))
        _one_of("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _one_of("model.activation", self.activation, ("gelu", "relu2", "swiglu"))
        _check(self.rope_base > 0, "model.rope_base must be positive")


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/default"
    """folder with train.bin, val.bin and manifest.json from data/prepare_dataset.py"""


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    """sequences per process per micro-step"""
    grad_accum_steps: int = 1
    """micro-steps per optimizer step; global batch = batch_size * grad_accum_steps * world_size"""
    max_steps: int = 5000
    """optimizer steps the schedule is planned for"""
    stop_at_step: int = 0
    """end after this optimizer step as a preemption does (checkpoint, clean exit); 0 = off"""
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    warmup_steps: int = 200
    schedule: str = "cosine"
    """cosine (warmup then cosine to min_lr) or wsd (warmup, constant, linear cooldown to min_lr)"""
    cooldown_frac: float = 0.2
    """wsd only: fraction of max_steps spent in the final linear cooldown"""
    optimizer: str = "adamw"
    """adamw, or muon (Muon on hidden 2-D weight matrices, AdamW on the rest)"""
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    """applied to matrices only, never to biases and norm gains"""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0 = no clipping (the norm is still logged)"""
    precision: str = "bf16"
    """auto, fp32, bf16 or fp16 (autocast; fp16 adds a GradScaler); auto: utils/precision.py decides per device"""
    compile: bool = False
    """torch.compile the model; falls back to eager with a warning when compilation fails"""
    fused_adamw: bool = True
    """use the fused AdamW kernel (CUDA, and CPU on torch 2.4+)"""
    tf32: bool = True
    """allow TF32 matmuls on Ampere and newer GPUs"""
    activation_checkpointing: bool = False
    """recompute each block's activations in backward to save memory"""
    seed: int = 1337
    eval_every: int = 500
    """optimizer steps between validation passes (and at the end); 0 = only at the end"""
    eval_max_bytes: int = 0
    """cap on validation bytes per pass (a fixed prefix, so still deterministic); 0 = whole split"""
    save_every: int = 1000
    """optimizer steps between checkpoints (and always at the end); 0 = only at the end"""
    keep_last: int = 3
    """step checkpoints kept besides best_model.pt"""
    log_every: int = 10
    max_nonfinite_steps: int = 5
    """stop after this many consecutive steps with a non-finite loss or gradient norm"""
    sample_prompt: str = "\n"
    """fixed prompt for the text sample written to TensorBoard at each evaluation"""
    sample_tokens: int = 200

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "max_steps", "log_every", "keep_last",
                     "max_nonfinite_steps"):
            _check(getattr(self, name) > 0, f"train.{name} must be positive (got {getattr(self, name)})")
        for name in ("stop_at_step", "warmup_steps", "eval_every", "save_every", "eval_max_bytes",
                     "sample_tokens", "weight_decay", "grad_clip"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0 (got {getattr(self, name)})")
        _check(self.lr > 0, f"train.lr must be positive (got {self.lr})")
        _check(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, train.lr] (got {self.min_lr})")
        _check(self.muon_lr > 0, f"train.muon_lr must be positive (got {self.muon_lr})")
        _check(0 <= self.muon_momentum < 1 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
               "train.beta1, train.beta2 and train.muon_momentum must be in [0, 1)")
        _check(0 <= self.cooldown_frac <= 1, "train.cooldown_frac must be in [0, 1]")
        _check(self.sample_tokens == 0 or self.sample_prompt != "",
               "train.sample_prompt must not be empty (or set train.sample_tokens=0)")
        _one_of("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _one_of("train.schedule", self.schedule, ("cosine", "wsd"))
        _one_of("train.optimizer", self.optimizer, ("adamw", "muon"))


@dataclass(frozen=True)
class DistributedConfig:
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), nccl or gloo"""
    timeout_s: int = 600
    """process-group init and collective timeout; a dead peer fails the job after this"""
    bucket_cap_mb: int = 25
    gradient_as_bucket_view: bool = True
    static_graph: bool = False

    def __post_init__(self) -> None:
        _one_of("distributed.backend", self.backend, ("auto", "nccl", "gloo"))
        _check(self.timeout_s > 0, "distributed.timeout_s must be positive")
        _check(self.bucket_cap_mb > 0, "distributed.bucket_cap_mb must be positive")


@dataclass(frozen=True)
class PathsConfig:
    checkpoint_dir: str = "checkpoints"
    log_dir: str = "logs"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else " (see configs/default_config.yaml)"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Convert a YAML or command-line value to the field's type, strictly."""
    bad = ConfigError(f"{key} must be {typ.__name__} (got {value!r})")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in ("true", "false", "1", "0"):
            return str(value).lower() in ("true", "1")
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        try:
            return int(str(value))  # rejects "2.5"
        except ValueError:
            raise bad from None
    if typ is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)  # PyYAML reads 1e-3 as a string; ints promote
        except (TypeError, ValueError):
            raise bad from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise TypeError(f"unsupported field type {typ}")


def _build(raw: dict) -> Config:
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of keys to values")
        sections[section] = cls(**{k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()})
    return Config(**sections)


def config_from_dict(raw: dict) -> Config:
    """Build a validated Config from a nested dict (a YAML file, or the copy in a checkpoint)."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of sections (model, data, train, ...)")
    keys = valid_keys()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown(str(section))
        for name in values if isinstance(values, dict) else ():
            if f"{section}.{name}" not in keys:
                raise _unknown(f"{section}.{name}")
    return _build(raw)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from the defaults), apply `section.key=value` overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (try configs/default_config.yaml)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    config_from_dict(raw)  # validates the file's own keys before overrides are applied
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.max_steps=50)")
        section, _, name = key.partition(".")
        if f"{section}.{name}" not in valid_keys():
            raise _unknown(key)
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {}, **{name: value})  # a string; _coerce converts it strictly
    return config_from_dict(raw)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


@dataclass(frozen=True)
class CliArgs:
    config: str | None
    device: str | None
    resume: str | None


def parse_cli(argv: list[str] | None, description: str) -> tuple[Config, CliArgs]:
    """The command line shared by both training entry points."""
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Overrides: section.key=value ... (e.g. train.max_steps=50 model.dim=64)")
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--device", default=None, help="auto (default: CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a checkpoint; 'auto' takes the newest valid one in paths.checkpoint_dir")
    args, overrides = parser.parse_known_args(argv)
    for item in overrides:
        if item.startswith("-"):
            parser.error(f"unrecognized argument: {item}")
    cfg = load_config(args.config, overrides)
    return cfg, CliArgs(config=args.config, device=args.device, resume=args.resume)


def run_cli(body: Callable[[], int]) -> int:
    """Run an entry point's body; a UserError becomes one `error: ...` line and exit code 2."""
    try:
        return body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

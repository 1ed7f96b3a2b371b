"""Loading a Config: YAML file, then `section.key=value` overrides, converted strictly to each field's
type, built once (so validation sees the final values); and back to a dict or YAML for config.yaml
and checkpoints. The command line is utils/train/cli.py.

Keys that moved when `train` was split into sections still work: MOVED maps each old name to its
new one, in files and on the command line alike. An unknown key is answered with the key the user meant:
ours of the same name in another section, the name other trainers give it (ELSEWHERE), why there is none
(NOT_HERE), or the closest spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from models.config import Config
from models.config_checks import ConfigError
from utils.text import encoding_problem, undecodable

SECTIONS: dict[str, type] = typing.get_type_hints(Config)
RAW_TEXT = {"eval.sample_prompt"}  # text the model reads as bytes: any bytes typed are meant (utils/text.py to_bytes)

# old key -> new key (the old `train` section held optimizer, schedule, eval and checkpoint cadence)
MOVED = {
    **{f"train.{k}": f"optim.{k}" for k in ("lr", "weight_decay", "beta1", "beta2", "muon_lr", "muon_momentum")},
    "train.optimizer": "optim.name", "train.fused_adamw": "optim.fused",
    "train.schedule": "schedule.name", "train.warmup_steps": "schedule.warmup_steps",
    "train.min_lr": "schedule.min_lr", "train.cooldown_frac": "schedule.cooldown_frac",
    "train.eval_every": "eval.every", "train.eval_max_bytes": "eval.max_bytes",
    "train.sample_prompt": "eval.sample_prompt", "train.sample_tokens": "eval.sample_tokens",
    "train.save_every": "checkpoint.every", "train.keep_last": "checkpoint.keep_last",
    "paths.checkpoint_dir": "checkpoint.dir", "paths.log_dir": "logging.dir",
    "train.max_nonfinite_steps": "health.max_consecutive",  # non-finite steps are health events now
}


# what users of other trainers (nanoGPT, Hugging Face's Trainer, the seed's README) call a key, by its last name
ELSEWHERE = {
    "learning_rate": "optim.lr", "max_iters": "train.max_steps", "num_epochs": "train.epochs",
    "max_epochs": "train.epochs", "eval_interval": "eval.every", "eval_steps": "eval.every",
    "eval_iters": "eval.max_bytes", "log_interval": "train.log_every", "logging_steps": "train.log_every",
    "save_interval": "checkpoint.every", "save_steps": "checkpoint.every", "checkpoint_every": "checkpoint.every",
    "save_total_limit": "checkpoint.keep_last", "warmup_iters": "schedule.warmup_steps",
    "lr_decay_iters": "train.max_steps", "gradient_accumulation_steps": "train.grad_accum_steps",
    "block_size": "model.context_length", "n_embd": "model.dim", "out_dir": "checkpoint.dir",
    "output_dir": "checkpoint.dir", "dtype": "train.precision", "mixed_precision": "train.precision",
    "gradient_checkpointing": "train.activation_checkpointing", "max_grad_norm": "train.grad_clip",
    "wandb_log": "logging.wandb", "wandb_run_name": "logging.wandb_name",
}
# names other trainers have that nothing here needs, and why
NOT_HERE = {
    "num_workers": "no loader workers to set: each batch is a few windows read from the memory-mapped shards "
                   "in the training process itself, as nanoGPT does",
    "pin_memory": "nothing to set: on CUDA each batch already travels from pinned memory, asynchronously",
    "device": "the device is not a config key: pass --device (auto, cpu, cuda, cuda:N or mps)",
    "resume": "resuming is not a config key: pass --resume PATH or --resume auto",
}


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _named(name: str) -> list[str]:
    """Our keys of this (last) name, moved ones by their new name; else the key another trainer's name means."""
    ours = sorted({MOVED.get(k, k) for k in valid_keys() + list(MOVED) if k.rpartition(".")[2] == name})
    return ours or ([ELSEWHERE[name]] if name in ELSEWHERE else [])


def _unknown(key: str) -> ConfigError:
    """The error for a key we do not have, with the key the user most likely meant."""
    name = key.rpartition(".")[2]
    if meant := _named(name):
        hint = f"did you mean {' or '.join(map(repr, meant))}?"
    elif name in NOT_HERE:
        hint = NOT_HERE[name]
    elif close := difflib.get_close_matches(key, valid_keys() + list(MOVED), n=1, cutoff=0.5):
        hint = f"did you mean {MOVED.get(close[0], close[0])!r}?"
    else:
        hint = "list them with --print-config"
    return ConfigError(f"unknown config key {key!r} ({hint})")


def _one_length(flat: dict[str, Any]) -> dict[str, Any]:
    """A source (the file, the command line) that plans the run by train.max_steps or by train.epochs
    clears the other from the sources beneath it; one that gives both is refused by TrainConfig's check."""
    for key, other in (("train.max_steps", "train.epochs"), ("train.epochs", "train.max_steps")):
        if other not in flat and str(flat.get(key, 0)).strip() != "0":
            flat[other] = 0
    return flat


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Convert a YAML or command-line value to the field's type, strictly."""
    bad = ConfigError(f"{key} must be {'a finite ' if typ is float else ''}{typ.__name__} (got {value!r})")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in ("true", "false", "1", "0"):
            return str(value).lower() in ("true", "1")
        raise bad
    if isinstance(value, (bool, dict, list)) or value is None:
        raise bad
    if typ is int:
        try:
            return value if isinstance(value, int) else int(str(value))  # rejects "2.5"
        except ValueError:
            raise bad from None
    if typ is float:
        try:
            number = float(value)  # PyYAML reads 1e-3 as a string; ints promote
        except (TypeError, ValueError, OverflowError):
            raise bad from None
        if not math.isfinite(number):
            raise bad
        return number
    if typ is str:
        text = str(value)
        problem = "it holds a NUL byte" if "\0" in text else encoding_problem(text)
        if not problem and key not in RAW_TEXT and (problem := undecodable(text)):  # TensorBoard, torch.save and
            problem += "; paths and names must be UTF-8 text"  # W&B encode them strictly, after the run has written
        if problem:
            raise ConfigError(f"{key} cannot be used: {problem} (got {text!r:.60})")
        return text
    raise TypeError(f"unsupported field type {typ}")


def _flatten(raw: Any, source: str) -> dict[str, Any]:
    """{'section.key': value} from a nested mapping, old key names translated."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of sections (model, data, train, ...)")
    flat = {}
    for section, values in raw.items():
        if not isinstance(values, dict):
            if values is None:
                continue
            raise ConfigError(f"config section '{section}' in {source} must be a mapping of keys to values")
        for name, value in values.items():
            key = f"{section}.{name}"
            flat[MOVED.get(key, key)] = value
    return _one_length(flat)


def _build(flat: dict[str, Any]) -> Config:
    keys = set(valid_keys())
    for key in flat:
        if key not in keys:
            raise _unknown(key)
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == section}
        sections[section] = cls(**{k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()})
    return Config(**sections)


def config_from_dict(raw: dict) -> Config:
    """Build a validated Config from a nested dict (a YAML file, or the copy in a checkpoint)."""
    return _build(_flatten(raw, "the config"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: plain YAML keeps the last
    one, so a second `model:` section would silently drop every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"'{key}' appears twice in one section; merge them", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (try configs/default_config.yaml)")
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} nests too deeply to be a config (sections hold keys, keys values)") from None
    except ValueError as e:  # an integer of thousands of digits (Python's int-string limit), a NUL in the text
        raise ConfigError(f"config file {p} holds a value no config can use: {str(e)[:120]}") from None


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a YAML file (or start from the defaults), apply `section.key=value` overrides. `base` (nested,
    like a config) replaces the defaults beneath both: a fine-tune's model section, from its checkpoint."""
    flat = _flatten(read_yaml(path), str(path)) if path is not None else {}
    _build(flat)  # the file's own keys and values are checked before overrides are applied
    flat = {**_flatten(base or {}, "the base config"), **flat}
    given = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            meant = " or ".join(f"{k}={value}" for k in _named(key)) if eq else ""
            raise ConfigError(f"override {item!r} must look like section.key=value "
                              f"({f'did you mean {meant}?' if meant else 'e.g. train.max_steps=50'})")
        key = MOVED.get(key, key)
        if key not in valid_keys():
            raise _unknown(key)
        given[key] = value  # a string; _coerce converts it strictly
    return _build({**flat, **_one_length(given)})


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)

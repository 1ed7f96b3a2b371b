"""The command line both training entry points share: `--config`, `--device`, `--resume`,
`section.key=value` overrides and `--print-config`."""

from __future__ import annotations

import ast
import dataclasses
import typing
from dataclasses import dataclass

from models.config import Config
from models.config_loader import SECTIONS, config_to_dict, load_config
from utils.errors import ArgumentParser, utf8_text
from utils.train.finetune import model_base


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal under it in the class body)."""
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: nxt.value.value for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def describe_config(cfg: Config) -> str:
    """Every key with its type, its value in cfg and its doc, straight from the dataclasses (--print-config)."""
    lines = []
    values = config_to_dict(cfg)
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            typ = typing.get_type_hints(cls)[f.name].__name__
            doc = f"  # {docs[f.name]}" if f.name in docs else ""
            lines.append(f"  {f.name}: {values[section][f.name]!r}  ({typ}){doc}")
    return "\n".join(lines)


@dataclass(frozen=True)
class CliArgs:
    config: str | None
    device: str | None
    resume: str | None


def parse_cli(argv: list[str] | None, description: str) -> tuple[Config, CliArgs]:
    """The command line shared by both training entry points."""
    parser = ArgumentParser(description=description,
                                     epilog="Overrides: section.key=value ... (e.g. train.max_steps=50 model.dim=64)")
    parser.add_argument("--config", type=utf8_text, default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--device", default=None,
                        help="auto, cpu, cuda, cuda:N or mps (default auto: CUDA, then MPS, then the CPU)")
    parser.add_argument("--resume", type=utf8_text, default=None, metavar="PATH|auto",
                        help="continue from a checkpoint; 'auto' takes the newest valid one in checkpoint.dir")
    parser.add_argument("--print-config", action="store_true",
                        help="list every config key with its type, value (the built-in default, or from --config "
                             "and the overrides) and meaning, then exit")
    args, overrides = parser.parse_known_args(argv)
    for item in overrides:
        if item.startswith("-"):
            parser.error(f"unrecognized argument: {item}")
    cfg = load_config(args.config, overrides)
    if cfg.train.init_from:  # a fine-tune's model section is its checkpoint's, beneath the file and overrides
        cfg = load_config(args.config, overrides,
                          base=model_base(cfg.train.init_from, args.resume, cfg.checkpoint.dir))
    if args.print_config:
        print(describe_config(cfg))
        parser.exit()
    return cfg, CliArgs(config=args.config, device=args.device, resume=args.resume)

"""Paths that exist: every file or folder of this repository that the README, the docs, the configs or the
code's comments name (a path under one of its folders, or a module run with -m) is there."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

FOLDERS = "configs|data|models|utils|scripts|dev|tests|docs|records|\\.ci"
# a path under one of our folders, as prose writes it (not inside another path or a URL)
PATH = re.compile(rf"(?<![\w./:-])((?:{FOLDERS})/[\w./*-]*[\w*])")
MODULE = re.compile(r"-m ((?:data|models|utils|scripts|dev)(?:\.\w+)+)")
# names the text tells the user to make (their own config, a dated record, a prepared dataset: data/*/ is
# theirs and git-ignored), so only data/*.py, our code, is checked under data/
PLACEHOLDER = re.compile(r"[A-Z]{3,}|^configs/my\.yaml$|^data/(?!\w+\.py$)")


def texts() -> list[Path]:
    docs = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), ROOT / "records" / "README.md"]
    code = [p for d in ("configs", "models", "utils", "scripts", "dev", "tests", ".ci") for p in (ROOT / d).rglob("*")
            if p.is_file() and (p.suffix in (".py", ".sh", ".yaml", ".md") or p.parent.name == ".ci")]
    top = [*ROOT.glob("*.py"), *(ROOT / "data").glob("*.py"), *(ROOT / n for n in ("pytest.ini", "pyproject.toml",
                                                                                   "requirements.txt",
                                                                                   "requirements-dev.txt"))]
    return [p for p in docs + code + top if p.is_file() and p != Path(__file__)]  # this file names examples


def named_paths(text: str) -> set[str]:
    """The repository paths a text names: paths under our folders and -m modules (as their files)."""
    paths = {m.rstrip(".") for m in PATH.findall(text)}
    paths |= {m.replace(".", "/") + ".py" for m in MODULE.findall(text)}
    return {p for p in paths if not PLACEHOLDER.search(p)}


def exists(path: str) -> bool:
    """A file or folder (a glob: anything it matches; a module's .py: its package folder too)."""
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists() or (ROOT / path.removesuffix(".py")).is_dir()


def test_every_path_the_docs_and_the_code_name_exists():
    missing = sorted(f"{p} (named in {f.relative_to(ROOT)})" for f in texts()
                     for p in named_paths(f.read_text(errors="replace")) if not exists(p))
    assert not missing, "\n".join(missing)


def test_the_rule_sees_paths_and_modules_and_leaves_out_placeholders():
    text = ("see utils/trainer.py and (utils/train/run.py), run python -m scripts.plan or -m dev.record; "
            "records/gpu1/DATE, configs/my.yaml, data/enwik8, ~/nanoGPT/data/shakespeare_char/prepare.py, "
            "https://x.org/docs/a.md, scripts/train_*.sh and data/prepare_dataset.py.")
    assert named_paths(text) == {"utils/trainer.py", "utils/train/run.py", "scripts/plan.py", "dev/record.py",
                                 "scripts/train_*.sh", "data/prepare_dataset.py"}
    assert exists("scripts/train_*.sh") and exists("dev/record.py") and not exists("utils/trainer.py")

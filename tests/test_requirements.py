"""Every import has its requirement: what the product imports at module level is in requirements.txt,
and everything the product or the tests import anywhere is in requirements.txt or requirements-dev.txt.
(A fresh machine once failed at collection because `hypothesis` was imported but listed nowhere.)"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from conftest import ROOT

OURS = {"data", "models", "scripts", "dev", "utils", "train_single", "train_ddp", "inference", "tests",
        *(p.stem for p in (ROOT / "tests").rglob("*.py")), *(p.name for p in (ROOT / "tests").iterdir() if p.is_dir())}


def requirements(name: str) -> set[str]:
    """Distribution names in a requirements file (and the files it includes), normalised."""
    found = set()
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            found |= requirements(line[3:].strip())
        elif line and not line.startswith("-"):
            found.add(normalise(re.split(r"[<>=!~\[; ]", line)[0]))
    return found


def normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def third_party_imports(files: list[Path], module_level_only: bool) -> dict[str, set[str]]:
    """top-level import name -> the files importing it, leaving out the standard library and our own."""
    found: dict[str, set[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OURS and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def distributions(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """distribution -> files, for each import name (an import that no installed distribution provides
    is reported under its own name: it cannot be listed correctly either)."""
    provided = packages_distributions()
    out: dict[str, set[str]] = {}
    for name, where in imports.items():
        for dist in provided.get(name, [name]):
            out.setdefault(normalise(dist), set()).update(where)
    return out


def product_files() -> list[Path]:
    return [*(p for d in ("data", "models", "utils", "scripts", "dev") for p in (ROOT / d).rglob("*.py")),
            *(ROOT / f"{n}.py" for n in ("train_single", "train_ddp", "inference"))]


def test_every_import_of_the_product_and_the_tests_is_a_requirement():
    """No import anywhere that a fresh `pip install -r requirements-dev.txt` would not provide."""
    listed = requirements("requirements-dev.txt")
    files = [*product_files(), *(ROOT / "tests").rglob("*.py")]
    missing = {d: sorted(w)[:3] for d, w in distributions(third_party_imports(files, False)).items() if d not in listed}
    assert not missing, f"imported but not in requirements-dev.txt (or requirements.txt): {missing}"


def test_what_training_imports_at_start_is_in_requirements_txt():
    """Module-level imports of the library and the entry points need only requirements.txt; optional extras
    (pyarrow, wandb, matplotlib, transformers) are imported where they are used, with a one-line error."""
    listed = requirements("requirements.txt")
    files = [p for p in product_files() if p.parent.name not in ("scripts", "dev")]
    missing = {d: sorted(w)[:3] for d, w in distributions(third_party_imports(files, True)).items() if d not in listed}
    assert not missing, f"imported at module level but not in requirements.txt: {missing}"

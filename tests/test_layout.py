"""The layout keeps its promises: imports run one way (read from the source), and every script runs
both by path and as a module from the repository root."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_TEXT, finish, start

ENTRY_POINTS = ("train_single", "train_ddp", "inference")
# who may stand on whom: a module may import its own group and any group of a lower rank
RANKS = {"ground": 0, "models": 1, "data": 1, "utils.distributed": 2, "utils.metrics": 2, "utils.checkpoint": 3,
         "utils.train": 4, "scripts": 5, "entry": 5}


def product_files() -> dict[str, Path]:
    """module name -> file, for everything but the tests."""
    files = [f for d in ("data", "models", "scripts", "utils") for f in (ROOT / d).rglob("*.py")]
    files += [ROOT / f"{name}.py" for name in ENTRY_POINTS]
    out = {}
    for f in files:
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def group(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "utils":
        return "ground" if len(parts) <= 2 and module not in {"utils.distributed", "utils.metrics",
                                                             "utils.checkpoint", "utils.train"} else ".".join(parts[:2])
    return "entry" if module in ENTRY_POINTS else parts[0]


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from utils.checkpoint import sharded` imports the module utils.checkpoint.sharded
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != module)
    return found


def graph() -> dict[str, set[str]]:
    known = product_files()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_imports_run_one_way():
    """Ground imports only ground; models/ and data/ only ground; each utils package only what lies under
    it; nothing imports a script or an entry point."""
    wrong = []
    for module, deps in graph().items():
        g = group(module)
        for dep in deps:
            d = group(dep)
            if d != g and RANKS[d] >= RANKS[g] or d in ("scripts", "entry") and dep != module:
                wrong.append(f"{module} ({g}) imports {dep} ({d})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_files_import_each_other():
    """No cycle of imports between files, of any length."""
    edges = graph()
    seen: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(m: str, path: list[str]) -> list[str] | None:
        seen[m] = 1
        for dep in sorted(edges[m]):
            if seen.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [m, dep]
            if dep not in seen and (cycle := visit(dep, path + [dep])):
                return cycle
        seen[m] = 2
        return None

    for m in sorted(edges):
        if m not in seen and (cycle := visit(m, [m])):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: a ground module importing upward and a two-file cycle are reported."""
    known = {"utils.errors": tmp_path / "a.py", "utils.train.run": tmp_path / "b.py"}
    known["utils.errors"].write_text("def f():\n    from utils.train.run import x\n")
    known["utils.train.run"].write_text("from utils import errors\n")
    assert imports("utils.errors", known["utils.errors"], known) == {"utils.train.run"}
    assert imports("utils.train.run", known["utils.train.run"], known) == {"utils.errors"}
    assert RANKS[group("utils.train.run")] > RANKS[group("utils.errors")]


def scripts() -> list[str]:
    found = [f"scripts.{p.stem}" for p in sorted((ROOT / "scripts").glob("*.py")) if p.stem != "__init__"]
    return [*found, "data.prepare_dataset", *ENTRY_POINTS]


@pytest.mark.slow
def test_every_script_runs_by_path_and_as_a_module():
    """`python scripts/x.py --help` and `python -m scripts.x --help` both work, for every script."""
    procs = {}
    for module in scripts():
        path = module.replace(".", "/") + ".py"
        procs[(module, "path")] = start([sys.executable, path, "--help"])
        procs[(module, "module")] = start([sys.executable, "-m", module, "--help"])
    failed = []
    for (module, how), proc in procs.items():
        done = finish(proc, 180)
        if done.returncode != 0 or "usage:" not in done.stdout:
            failed.append(f"{module} by {how}: exit {done.returncode}\n{done.stderr[-500:]}")
    assert not failed, "\n".join(failed)


def test_data_preparation_runs_both_ways(tmp_path):
    """The original first command, by path, prepares the same dataset as the module form."""
    (tmp_path / "in.txt").write_text(TINY_TEXT)
    outs = []
    for how in (["data/prepare_dataset.py"], ["-m", "data.prepare_dataset"]):
        out = tmp_path / f"out{len(outs)}"
        done = finish(start([sys.executable, *how, "--input", tmp_path / "in.txt", "--out", out]), 120)
        assert done.returncode == 0, done.stderr
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".bin"})
    assert outs[0] == outs[1] and outs[0]

"""The layout keeps its promises: the top level holds what the README's map says, imports run one way
(read from the source), and every script runs both by path and as a module, with the code of the checkout
it stands in, whatever checkout was installed in editable mode."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_TEXT, child_env, finish, start

ENTRY_POINTS = ("train_single", "train_ddp", "inference")
PACKAGES = ("data", "models", "utils", "scripts", "dev")
# who may stand on whom: a module may import its own group and any group of a lower rank
RANKS = {"ground": 0, "models": 1, "data": 1, "utils.distributed": 2, "utils.metrics": 2, "utils.checkpoint": 3,
         "utils.train": 4, "scripts": 5, "dev": 5, "entry": 5}
# the design's top level: the user's folders and entry points, the tests, docs/, records/, the research tools
# (dev/), and the files that install, test and check the repository; checkpoints/ and logs/ are git-ignored
TOP_LEVEL = {"README.md", "requirements.txt", ".gitignore", "configs", "data", "models", "utils", "scripts",
             *(f"{name}.py" for name in ENTRY_POINTS), "tests", "docs", "records", "dev",
             "requirements-dev.txt", "pyproject.toml", "pytest.ini", ".ci"}


def test_the_top_level_holds_what_the_map_says():
    """Every tracked file lies in a folder or is a file of the design's top level."""
    git = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if git.returncode != 0:
        pytest.skip(f"not a git checkout: {git.stderr.decode(errors='replace').strip()}")
    tops = {path.split(b"/")[0].decode(errors="replace") for path in git.stdout.split(b"\0") if path}
    assert tops <= TOP_LEVEL, f"not in the layout: {sorted(tops - TOP_LEVEL)}"


def product_files() -> dict[str, Path]:
    """module name -> file, for everything but the tests."""
    files = [f for d in PACKAGES for f in (ROOT / d).rglob("*.py")]
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


def programs() -> set[str]:
    """The modules that run as programs: entry points, scripts and the research tools (not their helpers)."""
    return {m for m, path in product_files().items()
            if group(m) in ("scripts", "entry", "dev") and 'if __name__ == "__main__":' in path.read_text()}


def test_imports_run_one_way():
    """Ground imports only ground; models/ and data/ only ground; each utils package only what lies under
    it; nothing outside dev/ imports dev/; nothing imports a program (an entry point, a script, a tool)."""
    wrong, running = [], programs()
    for module, deps in graph().items():
        g = group(module)
        for dep in deps:
            d = group(dep)
            if d != g and RANKS[d] >= RANKS[g] or dep in running:
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
    return sorted(programs() | {"data.prepare_dataset"})


# What `pip install -e FIRST` leaves in site-packages (setuptools' editable finder): the project's top-level
# names mapped to FIRST, after every sys.path entry. It stands in for whatever editable install is here.
INSTALLED = """import importlib.machinery, sys


class Installed:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in NAMES:
            return importlib.machinery.PathFinder.find_spec(name, [FIRST])


sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")] + [Installed]
"""
# an edit in the second checkout: each package says which file it was imported from
MARKER = '\nimport sys; sys.stderr.write(f"imported {__name__} from {__file__}\\n")\n'


def two_checkouts(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """(first, second, env): two copies of this checkout's code, the second's packages edited to name
    themselves, and a child environment in which the first is the one installed in editable mode."""
    first, second = tmp_path / "first", tmp_path / "second"
    for dest in (first, second):
        for f in [*(f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")), *ROOT.glob("*.py")]:
            (dest / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / f.relative_to(ROOT))
    for pkg in PACKAGES:
        with open(second / pkg / "__init__.py", "a") as f:
            f.write(MARKER)
    site = tmp_path / "site"
    site.mkdir()
    names = {*PACKAGES, *ENTRY_POINTS}
    (site / "sitecustomize.py").write_text(f"NAMES, FIRST = {names!r}, {str(first)!r}\n{INSTALLED}")
    return first, second, child_env(PYTHONPATH=str(site))


def ran_in(second: Path, done: subprocess.CompletedProcess) -> str | None:
    """What is wrong with a `--help` run that should have run the second checkout's code (None: nothing)."""
    imported = [line.split(" from ", 1)[1] for line in done.stderr.splitlines() if line.startswith("imported ")]
    if done.returncode != 0 or "usage:" not in done.stdout:
        return f"exit {done.returncode}\n{done.stderr[-500:]}"
    if str(second / "utils" / "__init__.py") not in imported or any(not p.startswith(str(second)) for p in imported):
        return f"imported {imported or 'none of the second checkout'}"
    return None


def test_a_script_run_by_path_runs_the_checkout_it_stands_in(tmp_path):
    """With another checkout installed in editable mode, and with that one deleted: data/prepare_dataset.py
    run by path, from elsewhere, runs the edited code of its own checkout; `python -m` from its root too."""
    first, second, env = two_checkouts(tmp_path)
    runs = {"by path": ([sys.executable, second / "data/prepare_dataset.py", "--help"], tmp_path),
            "as a module": ([sys.executable, "-m", "data.prepare_dataset", "--help"], second)}
    wrong = []
    for when in ("installed", "deleted"):
        if when == "deleted":
            shutil.rmtree(first)
        for how, (cmd, cwd) in runs.items():
            if problem := ran_in(second, finish(start(cmd, env, cwd=cwd), 120)):
                wrong.append(f"{how}, the first checkout {when}: {problem}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_every_script_runs_by_path_and_as_a_module(tmp_path):
    """`python scripts/NAME.py --help` (from elsewhere) and `python -m scripts.NAME --help` (from the root) both
    work for every program, with the code of their own checkout while the installed one is deleted."""
    first, second, env = two_checkouts(tmp_path)
    shutil.rmtree(first)
    procs = {}
    for module in scripts():
        procs[(module, "by path")] = start([sys.executable, second / (module.replace(".", "/") + ".py"), "--help"],
                                           env, cwd=tmp_path)
        procs[(module, "as a module")] = start([sys.executable, "-m", module, "--help"], env, cwd=second)
    wrong = [f"{module} {how}: {problem}" for (module, how), proc in procs.items()
             if (problem := ran_in(second, finish(proc, 180)))]
    assert not wrong, "\n".join(wrong)


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

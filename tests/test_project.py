"""The project's plumbing: CI checks style before the tests; the package stands without experiments/; the
subpackages are layers, each importing only those below it; entry points are thin."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The house from the ground up (docs/DESIGN.md): a module imports its own subpackage or a lower floor, never
# a floor above or a neighbour on its own floor (training and analysis; io and generation; cli and bench
# stand one above the other, bench using cli's flags).
FLOORS = {"model": 0, "parallel": 1, "training": 2, "analysis": 2, "io": 3, "generation": 3, "lab": 4}
FLOORS |= {"cli": 5, "bench": 6}
MODULES = sorted((ROOT / "shardgpt").rglob("*.py"))


def _imported_subpackages(path: Path) -> set[str]:
    """The shardgpt subpackages `path` imports (at any depth: lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("shardgpt.") and n.count(".") >= 1}
    return found & set(FLOORS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_runs_down_the_layers(path):
    parts = path.relative_to(ROOT / "shardgpt").parts
    if len(parts) == 1:  # shardgpt/__init__.py
        assert not _imported_subpackages(path)
        return
    home = parts[0]
    assert home in FLOORS, f"{home}/ is not a floor of the house: add it to FLOORS and docs/DESIGN.md"
    up = {p for p in _imported_subpackages(path) if p != home and FLOORS[p] >= FLOORS[home]}
    assert not up, f"{path.relative_to(ROOT)} imports {sorted(up)}, on its floor or above: move the code down"


def test_entry_points_are_thin_and_need_no_path_edits():
    """experiments/*.py call a main in the package; nothing edits sys.path or reads ../shared."""
    for path in sorted((ROOT / "experiments").glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text and len(text.splitlines()) <= 20, path.name
    for path in [*MODULES, *(ROOT / "experiments").glob("*.py")]:
        assert "sys.path" not in path.read_text(), path


def test_ci_runs_lint_before_the_tests():
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make lint" in steps and "make test" in steps, steps
    assert steps.index("make lint") < steps.index("make test")


def test_the_package_needs_nothing_from_experiments():
    """lab runs the generation benchmark from the package: experiments/ is a client, never a dependency."""
    code = "import sys, shardgpt.lab.runner; print([m for m in sys.modules if m == 'generation'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-500:]


def test_the_design_document_is_in_the_repo_and_names_every_module():
    """docs/DESIGN.md is the newcomer's map: the README links it, and a module it does not name is a room
    missing from the map."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    assert "docs/DESIGN.md" in (ROOT / "README.md").read_text()
    modules = sorted(str(p.relative_to(ROOT / "shardgpt")) for p in MODULES if p.stem != "__init__")
    missing = [m for m in modules if m not in design]
    assert not missing, f"docs/DESIGN.md does not describe {missing}: add a line for each"

"""The project's plumbing: CI checks style before the tests; the package stands without experiments/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_lint_before_the_tests():
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make lint" in steps and "make test" in steps, steps
    assert steps.index("make lint") < steps.index("make test")


def test_the_package_needs_nothing_from_experiments():
    """lab runs the generation benchmark from the package: experiments/ is a client, never a dependency."""
    code = "import sys, shardgpt.lab; print([m for m in sys.modules if m == 'generation'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-500:]


def test_the_design_document_is_in_the_repo_and_names_every_module():
    """docs/DESIGN.md is the newcomer's map: the README links it, and a module it does not name is a room
    missing from the map."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    assert "docs/DESIGN.md" in (ROOT / "README.md").read_text()
    modules = sorted(p.stem for p in (ROOT / "shardgpt").glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if f"{m}.py" not in design and f"`{m}`" not in design]
    assert not missing, f"docs/DESIGN.md does not describe {missing}: add a line for each"

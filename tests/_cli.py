"""experiments/run.py loaded as a module (a script, not part of the package), for the CLI tests."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_cli", ROOT / "experiments" / "run.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

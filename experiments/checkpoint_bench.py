"""Checkpoint costs: save (async vs blocking), bytes, restore, and the step time lost to saving.

The command lives in shardgpt.bench.checkpoint (`--help` lists its flags).
"""

import sys

try:
    from shardgpt.bench.checkpoint import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

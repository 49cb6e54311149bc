"""Compare sharding strategies side by side (also the `shardgpt-run` command).

The command lives in shardgpt.cli.run (`python experiments/run.py --help` lists its flags).
"""

import sys

try:
    from shardgpt.cli.run import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

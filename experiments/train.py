"""Train one run with checkpoints, resume onto any mesh, and a NaN guard (also `shardgpt-train`).

The command lives in shardgpt.cli.train (`python experiments/train.py --help` lists its flags).
"""

import sys

try:
    from shardgpt.cli.train import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

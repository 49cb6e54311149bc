"""Sample from a train.py checkpoint directory or a weight file (also `shardgpt-sample`).

The command lives in shardgpt.cli.sample (`python experiments/sample.py --help` lists its flags).
"""

import sys

try:
    from shardgpt.cli.sample import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

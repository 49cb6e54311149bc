"""Train one run with checkpoints, resume onto any mesh, and a NaN guard (also `shardgpt-train`).

The command lives in shardgpt.cli.train (`python experiments/train.py --help` lists its flags).
"""

import sys

from shardgpt.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

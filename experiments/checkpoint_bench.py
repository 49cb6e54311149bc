"""Checkpoint costs: save (async vs blocking), bytes, restore, and the step time lost to saving.

The command lives in shardgpt.bench.checkpoint (`--help` lists its flags).
"""

import sys

from shardgpt.bench.checkpoint import main

if __name__ == "__main__":
    sys.exit(main())

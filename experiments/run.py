"""Compare sharding strategies side by side (also the `shardgpt-run` command).

The command lives in shardgpt.cli.run (`python experiments/run.py --help` lists its flags).
"""

import sys

from shardgpt.cli.run import main

if __name__ == "__main__":
    sys.exit(main())

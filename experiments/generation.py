"""Generation benchmark: naive re-jit vs fixed-shape recompute vs KV cache, side by side.

The command lives in shardgpt.bench.generation (`python experiments/generation.py --help` lists its flags).
"""

import sys

from shardgpt.bench.generation import main

if __name__ == "__main__":
    sys.exit(main())

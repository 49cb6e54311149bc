"""Generation benchmark: naive re-jit vs fixed-shape recompute vs KV cache, side by side.

The command lives in shardgpt.bench.generation (`python experiments/generation.py --help` lists its flags).
"""

import sys

try:
    from shardgpt.bench.generation import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

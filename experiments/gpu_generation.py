"""Generation on one accelerator: shardgpt's compiled generator, beside a plain-JAX anchor file if given.

The command lives in shardgpt.bench.gpu_generation (`--help` lists its flags).
"""

import sys

try:
    from shardgpt.bench.gpu_generation import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

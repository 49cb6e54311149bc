"""The pipeline's bubble, measured: GPipe at M = pp, 2 pp and 4 pp microbatches of one size.

The command lives in shardgpt.bench.pipeline (`python experiments/pipeline_bench.py --help` lists its flags).
"""

import sys

try:
    from shardgpt.bench.pipeline import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

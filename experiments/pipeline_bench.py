"""The pipeline's bubble, measured: GPipe at M = pp, 2 pp and 4 pp microbatches of one size.

The command lives in shardgpt.bench.pipeline (`python experiments/pipeline_bench.py --help` lists its flags).
"""

import sys

from shardgpt.bench.pipeline import main

if __name__ == "__main__":
    sys.exit(main())

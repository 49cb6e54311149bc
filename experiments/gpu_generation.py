"""Generation on one accelerator: shardgpt's compiled generator, beside a plain-JAX anchor file if given.

The command lives in shardgpt.bench.gpu_generation (`--help` lists its flags).
"""

import sys

from shardgpt.bench.gpu_generation import main

if __name__ == "__main__":
    sys.exit(main())

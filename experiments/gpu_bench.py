"""One-GPU benchmark (`make bench-gpu`): every GPU figure, in sections under one time budget.

The command lives in shardgpt.bench.gpu (`python experiments/gpu_bench.py --help` lists its flags).
"""

import sys

try:
    from shardgpt.bench.gpu import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    main()  # returns the results it wrote, not a status: a run that records its failures exits 0

"""Calibrate the cpu hardware profile by microbenchmarks (never by the runs it predicts).

The command lives in shardgpt.bench.cpu_calibrate.
"""

import sys

try:
    from shardgpt.bench.cpu_calibrate import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

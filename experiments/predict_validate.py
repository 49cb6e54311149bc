"""Validate the cost model on this CPU: predicted against measured step times, Spearman's rho.

The command lives in shardgpt.bench.predict_validate.
"""

import sys

try:
    from shardgpt.bench.predict_validate import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

"""The cost model against published step times (llm.c, MaxText on JAX-Toolbox).

The command lives in shardgpt.bench.predict_anchors.
"""

import sys

try:
    from shardgpt.bench.predict_anchors import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name != "shardgpt":
        raise
    sys.exit(f"{e}: pip install -e . in the checkout first (or run with PYTHONPATH=.)")

if __name__ == "__main__":
    sys.exit(main())

"""Compare sharding strategies side by side (placeholder until the experiments issue lands)."""

print("experiments/run.py: the strategy comparison is not built yet; see README.md for the library tour.")

"""The commands: argument groups, validation before any compile, and the `run` and `train` entry points
(`experiments/*.py` and the `shardgpt-*` console scripts call these). Imports jax only after the flags
are parsed.
"""

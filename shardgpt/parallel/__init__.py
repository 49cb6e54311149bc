"""The parallel layer: meshes, strategies as logical-axis rule tables, the shard_map hooks and the
schedules they place (pipeline, ring attention, microbatches), several processes, XLA's flags. Uses `model`.
"""

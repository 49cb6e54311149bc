"""The parallel layer: meshes, strategies as logical-axis rule tables, the checks of a run's layout, the
implementations' plans (GSPMD's, shard_map's) and the schedules they place (pipeline, ring attention,
microbatches), several processes, XLA's flags. Uses `model`.
"""

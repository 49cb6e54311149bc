"""The training layer: state sharded from birth, the loss, the optimizer, the data, and the two steps
(GSPMD's jitted step, shard_map's by hand) with the Trainer loop. Uses `model` and `parallel`.
"""

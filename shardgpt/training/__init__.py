"""The training layer: state sharded from birth, the loss, the optimizer, the data, the one train step
(step.py) and its implementations (GSPMD's in train.py, shard_map's by hand), and the Trainer loop. Uses
`model` and `parallel`.
"""

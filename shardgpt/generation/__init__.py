"""Generation: prefill and a fixed-shape decode loop over a sharded KV cache, one compile. Uses the layers
below.
"""

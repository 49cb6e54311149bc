"""The analysis layer, beside training: collectives read from compiled HLO, their causes, theory's bytes
per cause, FLOPs, MFU and memory. Uses `model` and `parallel`.
"""

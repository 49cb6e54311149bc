"""The model layer: `ModelConfig` and its presets, and the GPT (one definition, logical axis names on every
param and key activation). Knows nothing of meshes.
"""

"""The weights in and out: GPT-2-named weight files (minGPT, nanoGPT, Hugging Face) and orbax checkpoints.
Uses the layers below.
"""

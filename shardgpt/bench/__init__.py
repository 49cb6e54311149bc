"""Benchmark commands (checkpoint costs, one GPU, generation, the pipeline's bubble), each a `main(argv)`
that an `experiments/*.py` script calls.
"""

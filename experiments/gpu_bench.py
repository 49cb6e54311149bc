"""One-GPU benchmark: gpt2 training MFU, decode against its bandwidth floor, naive decode.

The command lives in shardgpt.bench.gpu (`python experiments/gpu_bench.py --help` lists its flags).
"""

from shardgpt.bench.gpu import main

if __name__ == "__main__":
    main()

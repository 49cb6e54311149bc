"""shardgpt: a GPT whose data, tensor and ZeRO/FSDP sharding is one flag, with honest numbers for each."""

__version__ = "0.1.0"

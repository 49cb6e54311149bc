"""Test setup, before jax initialises: 8 simulated CPU devices, and XLA's CPU backend at -O0.

-O0 cuts compile time 2-4x on this 2-core machine; every comparison in the suite runs both sides under
the same flags, and the suite checks numerics, not speed.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
_present = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_present, *(f for f in _FLAGS if f.split("=")[0] not in _present)]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

"""Test setup: 8 fake CPU devices, so sharding is exercised on one machine.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top here.
"""

import os
import tempfile

# 8 host devices, with XLA:CPU's collectives kept in program order (see posttrain_jax/cpu_devices.py).
from posttrain_jax.cpu_devices import host_device_flags  # noqa: E402  (jax-free)

os.environ["XLA_FLAGS"] = host_device_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the whole run (and the subprocesses tests start): many tests compile
# the same small programs (model init, forward, sampler); later ones load them instead of compiling again.
# A fresh directory per run, so no test ever sees another run's programs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="posttrain_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """`slow` tests (real models, long AOT compiles) run only with POSTTRAIN_JAX_SLOW=1."""
    import pytest

    if os.environ.get("POSTTRAIN_JAX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set POSTTRAIN_JAX_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

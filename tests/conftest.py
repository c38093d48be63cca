"""Test-wide setup: eight simulated CPU devices for the sharding checks (before JAX starts)."""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

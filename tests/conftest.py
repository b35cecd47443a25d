"""Test-wide setup: 8 fake CPU devices so sharding is exercised, quiet TensorFlow."""

import os

# Must be set before jax is imported anywhere; `make test` sets the same flag.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

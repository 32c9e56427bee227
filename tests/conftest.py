"""Test configuration: JAX is strict here, so silent broadcasting or promotion fails."""

import os

# Several test workers may share one GPU: take memory as needed instead of 75% each.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

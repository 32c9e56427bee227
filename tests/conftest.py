"""Test configuration: JAX is strict here, so silent broadcasting or promotion fails."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

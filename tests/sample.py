"""Random test inputs drawn with NumPy, returned as JAX arrays.

``jax.random`` compiles a program for every shape and dtype it draws (threefry and the
normal's inverse error function: about half a second each on the 2-core CPU), and the tests
draw a few hundred different shapes: drawing with NumPy compiles nothing, and neither does
``jax.device_put`` of the result (``jnp.asarray`` would compile a small copying program per
shape and dtype). Each function takes a ``seed`` and gives the same array for the same
arguments, on every machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _generator(seed):
    return np.random.default_rng(seed)


def normal(seed, shape, dtype=jnp.float32, *, scale=1.0):
    """``scale * N(0, 1)`` of ``shape``, drawn in float64 and rounded once to ``dtype``."""
    return jax.device_put((scale * _generator(seed).standard_normal(shape)).astype(dtype))


def uniform(seed, shape, dtype=jnp.float32, *, low=0.0, high=1.0):
    """Uniform on ``[low, high)``."""
    return jax.device_put(_generator(seed).uniform(low, high, shape).astype(dtype))


def integers(seed, shape, low, high, dtype=jnp.int32):
    """Integers uniform on ``[low, high)``."""
    return jax.device_put(_generator(seed).integers(low, high, shape).astype(dtype))


def bernoulli(seed, probability, shape):
    """Booleans, each true with ``probability``."""
    return jax.device_put(_generator(seed).uniform(size=shape) < probability)


def probabilities(seed, shape, dtype=jnp.float32, *, scale=1.0, axis=-1):
    """Rows of a softmax of ``scale * N(0, 1)`` along ``axis``: positive, summing to 1."""
    z = scale * _generator(seed).standard_normal(shape)
    p = np.exp(z - z.max(axis=axis, keepdims=True))
    return jax.device_put((p / p.sum(axis=axis, keepdims=True)).astype(dtype))


def split(seed, num):
    """``num`` independent seeds derived from ``seed``, as ``jax.random.split`` splits a key:
    a helper that draws several arrays from one ``seed`` gives each draw its own. (Not
    ``(seed, i)``: NumPy seeds ``(seed, 0)`` as it seeds ``seed``.)"""
    return np.random.SeedSequence(seed).spawn(num)


# NumPy arrays, the same values as the functions above (which put them on the device). Pass
# them to a jitted function as they are (its arguments), or through ``jax.device_put`` where a
# test needs a ``jax.Array`` (an eager call): neither compiles anything.


def numpy_normal(seed, shape, dtype=np.float32, *, scale=1.0):
    """:func:`normal` as a NumPy array."""
    return (scale * _generator(seed).standard_normal(shape)).astype(dtype)


def numpy_uniform(seed, shape, dtype=np.float32, *, low=0.0, high=1.0):
    """:func:`uniform` as a NumPy array."""
    return _generator(seed).uniform(low, high, shape).astype(dtype)


def numpy_integers(seed, shape, low, high, dtype=np.int32):
    """:func:`integers` as a NumPy array."""
    return _generator(seed).integers(low, high, shape).astype(dtype)


def numpy_bernoulli(seed, probability, shape):
    """:func:`bernoulli` as a NumPy array."""
    return _generator(seed).uniform(size=shape) < probability


def numpy_probabilities(seed, shape, dtype=np.float32, *, scale=1.0, axis=-1):
    """:func:`probabilities` as a NumPy array."""
    z = scale * _generator(seed).standard_normal(shape)
    p = np.exp(z - z.max(axis=axis, keepdims=True))
    return (p / p.sum(axis=axis, keepdims=True)).astype(dtype)

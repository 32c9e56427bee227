"""Online row statistics: a softmax's maximum and sum of exponentials, one chunk at a time.

A fused loss never holds a whole row of logits ``x``; it visits the row's classes chunk by
chunk and keeps per row the running maximum ``m`` and the sum of exponentials relative to
it, ``s = sum_c exp(x_c - m)``. When a chunk raises the maximum to ``m'`` the old sum is
rescaled by ``exp(delta)``, ``delta = m - m'``::

    m' = max(m, max_new x_c)
    s' = s exp(m - m') + sum_new exp(x_c - m')

so that at the end ``lse(x) = m + log s`` without ever exponentiating a large logit. Before
any class is counted ``m = -inf`` and ``delta`` is taken as 0. Vocabulary shards combine
their ``(m_k, s_k)`` the same way, with the global maximum as ``m'``
(:func:`across_shards`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def update(top, total, x):
    """One chunk's update of a row's running maximum and sum of exponentials of ``x``:
    ``(m', s', delta, exp(x - m'), m')`` with ``delta = m - m'`` (0 before any class) and
    ``s' = s exp(delta) + sum_c exp(x_c - m')``."""
    new_top = jnp.maximum(top, jnp.max(x, axis=-1))
    shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # -inf: no class counted yet
    delta = jnp.where(jnp.isfinite(top), top - shift, 0.0)
    exponentials = jnp.exp(x - shift[:, None])
    total = total * jnp.exp(delta) + jnp.sum(exponentials, axis=-1)
    return new_top, total, delta, exponentials, shift


def across_shards(top, total, axis_name):
    """The vocabulary shards' ``(m, s)`` combined, and each shard's ``delta = m_k - m``."""
    global_top = lax.pmax(top, axis_name)
    shift = jnp.where(jnp.isfinite(global_top), global_top, 0.0)
    delta = jnp.where(jnp.isfinite(top), top - shift, 0.0)
    return global_top, lax.psum(total * jnp.exp(delta), axis_name), delta

r"""Each token's log-probability and the policy's entropy, with their derived rule.

Reinforcement learning scores sampled tokens: at each position, logits ``z`` over ``V``
classes, a temperature ``T``, the tempered logits ``x = z / T`` and the policy
``p = softmax(x)``. For the sampled token ``y``:

.. math::

   \log p_y = x_y - \operatorname{lse}(x), \qquad
   H = -\sum_c p_c \log p_c = \operatorname{lse}(x) - \sum_c p_c x_c .

Their derivatives with respect to the logits (docs/derivation.md, section 10):

.. math::

   \frac{\partial \log p_y}{\partial z} = \frac{\mathrm{onehot}(y) - p}{T}, \qquad
   \frac{\partial H}{\partial z} = -\frac{p\,(\log p + H)}{T}.

:func:`log_probs_and_entropy` is a ``jax.custom_jvp`` whose tangent rule is these two rows
applied to a tangent ``dz``: ``(dz_y - <p, dz>) / T`` and ``-<p (log p + H), dz> / T``. Both
are linear in ``dz``, so JAX transposes them for reverse mode, which gives, for cotangents
``g`` on ``log p_y`` and ``g_H`` on ``H``, ``dz = (g (onehot(y) - p) - g_H p (log p + H)) / T``:
forward and reverse mode from the one derived rule. Computed in float32 for bf16, f16 and
f32 logits (float64 for float64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsoftmax.core.row_terms import compute_dtype


def _policy(logits, tokens, row_mask, temperature):
    """``(log p_y, H, log p, p)`` per row, rows outside ``row_mask`` all zero."""
    x = logits.astype(compute_dtype(logits.dtype)) / temperature
    x = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    log_p = x - jnp.log(jnp.sum(jnp.exp(x), axis=-1, keepdims=True))
    p = jnp.exp(log_p)
    p_log_p = jnp.where(p > 0, p * log_p, 0.0)  # 0 log 0 = 0 (a class at -inf)
    entropy = -jnp.sum(p_log_p, axis=-1)
    num_classes = logits.shape[-1]
    in_range = (tokens >= 0) & (tokens < num_classes)
    picked = jnp.take_along_axis(log_p, jnp.clip(tokens, 0, num_classes - 1)[..., None], -1)
    log_p_y = jnp.where(in_range, picked[..., 0], jnp.nan)  # a token out of range: NaN
    if row_mask is not None:
        log_p_y, entropy = (jnp.where(row_mask, v, 0.0) for v in (log_p_y, entropy))
        p, p_log_p = (jnp.where(row_mask[..., None], v, 0.0) for v in (p, p_log_p))
    return log_p_y, entropy, log_p, p, p_log_p


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def log_probs_and_entropy(logits, tokens, row_mask, temperature: float):
    """``(log p_y, H)`` per row of ``logits [..., V]`` for integer ``tokens [...]``; rows where
    ``row_mask [...]`` (or None) is False give 0 and a zero derivative."""
    return _policy(logits, tokens, row_mask, temperature)[:2]


@log_probs_and_entropy.defjvp
def _log_probs_and_entropy_jvp(temperature, primals, tangents):
    logits, tokens, row_mask = primals
    d_logits = tangents[0]
    log_p_y, entropy, _, p, p_log_p = _policy(logits, tokens, row_mask, temperature)
    dx = d_logits.astype(p.dtype) / temperature
    num_classes = logits.shape[-1]
    d_picked = jnp.take_along_axis(dx, jnp.clip(tokens, 0, num_classes - 1)[..., None], -1)
    # d log p_y = dx_y - <p, dx>;  dH = -<p (log p + H), dx>
    d_log_p_y = d_picked[..., 0] - jnp.sum(p * dx, axis=-1)
    d_entropy = -jnp.sum((p_log_p + p * entropy[..., None]) * dx, axis=-1)
    if row_mask is not None:
        d_log_p_y = jnp.where(row_mask, d_log_p_y, 0.0)
    return (log_p_y, entropy), (d_log_p_y, d_entropy)

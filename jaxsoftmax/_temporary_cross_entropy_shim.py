"""Stand-in for ``jaxsoftmax._cross_entropy.cross_entropy`` until the core loss lands on main.

Same signature and PyTorch ``F.cross_entropy`` semantics, written with plain autodiff. Deleted once
``main`` provides the real function; nothing outside ``mlp.py`` imports it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits,
    targets,
    *,
    axis=-1,
    where=None,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    logit_softcap=None,
    reduction="mean",
):
    logits = jnp.moveaxis(jnp.asarray(logits), axis, -1)
    num_classes = logits.shape[-1]
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    targets = jnp.asarray(targets)
    integer = jnp.issubdtype(targets.dtype, jnp.integer)
    if integer:
        valid = jnp.ones(targets.shape, bool)
        if ignore_index is not None:
            valid = targets != ignore_index
        probs = jax.nn.one_hot(jnp.where(valid, targets, 0), num_classes, dtype=logits.dtype)
    else:
        probs = jnp.moveaxis(targets, axis, -1).astype(logits.dtype)
        valid = jnp.ones(probs.shape[:-1], bool)
    if label_smoothing:
        probs = probs * (1 - label_smoothing) + label_smoothing / num_classes
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    if class_weights is not None:
        w = jnp.asarray(class_weights, logits.dtype)
        per = -jnp.sum(w * probs * log_probs, axis=-1)
        if integer:
            weight = w[jnp.where(valid, targets, 0)]
        else:
            weight = jnp.ones(per.shape, logits.dtype)
    else:
        per = -jnp.sum(probs * log_probs, axis=-1)
        weight = jnp.ones(per.shape, logits.dtype)
    per = per + z_loss * log_z**2
    if where is not None:
        valid = valid & where
    per = jnp.where(valid, per, 0.0)
    weight = jnp.where(valid, weight, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return jnp.sum(per)
    return jnp.sum(per) / jnp.sum(weight)

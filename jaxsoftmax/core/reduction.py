"""The reductions of per-example losses, as PyTorch defines them, in one place."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def reduce_loss(loss, row_weight, reduction: str, batch_axis_names: tuple = ()):
    """A PyTorch reduction of per-example losses; a mean over no counted example is 0.

    ``"mean"`` is ``sum_n loss_n / sum_n r_n`` with ``r_n`` each example's weight
    (``row_weight``: ``w[label]`` with class weights, else 1; 0 where not counted). With
    ``batch_axis_names`` (inside ``shard_map``, examples split over those mesh axes) both
    sums are finished by a ``psum``, so the mean equals the single-device one, not a mean
    of the shards' means.
    """
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if batch_axis_names:
        total = lax.psum(total, batch_axis_names)
    if reduction == "sum":
        return total
    denominator = jnp.sum(row_weight)
    if batch_axis_names:
        denominator = lax.psum(denominator, batch_axis_names)
    counted = denominator > 0
    return jnp.where(counted, total / jnp.where(counted, denominator, 1.0), 0.0)

"""The row terms of the rule: the pieces of :mod:`jaxsoftmax.core.rule`'s forward and backward.

Each function computes one named quantity of the derivation in docs/derivation.md for
class-last logits ``[..., C]``: the capped logits ``x``, the row statistics ``(m, log_sum)``,
the target vector ``q``, its total ``Q = sum_c q_c``, the row weight ``r``, the per-row loss
from those numbers, and the backward expression ``dL/dz = (scale * softmax(x) - q) * g *
(1 - (x / cap)^2)``. The rule (:mod:`jaxsoftmax.core.rule`) composes them; the fused loss
(:mod:`jaxsoftmax.tiles`) calls them per tile, given a :class:`ClassBlock` that says which
classes of the row the tile holds. Plain JAX, no argument checks: the public losses check
first. With ``options.axis_name`` every sum or maximum over the class axis ends in a
``psum`` / ``pmax`` of per-row values.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class RuleOptions:
    """The rule's static (hashable) options: ``eps`` (``label_smoothing``), ``beta``
    (``z_loss``), ``cap`` (``logit_softcap``, None for none) and the mapped axis the class
    axis is split over (``axis_name``, None for none)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    axis_name: object | None = None


class ClassBlock(NamedTuple):
    """Classes ``[offset, offset + width)`` of ``num_classes``: one tile of a row (the fused
    loss). The one-hot uses global indices, smoothing spreads over ``participating`` classes
    (``K``; all ``num_classes`` when None) and ``w[label]``, ``sum_c w_c`` use
    ``class_weights``, all ``C``. Integer targets only."""

    offset: object
    num_classes: int
    class_weights: jax.Array | None = None
    participating: object = None


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/f16/f32 logits, float64 for float64 logits."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype).itemsize > 4 else jnp.dtype(jnp.float32)


def is_indices(targets) -> bool:
    return jnp.issubdtype(targets.dtype, jnp.integer)


def sum_classes(x, options: RuleOptions):
    """Sum over the (possibly sharded) class axis, kept as size 1."""
    total = jnp.sum(x, axis=-1, keepdims=True)
    return total if options.axis_name is None else lax.psum(total, options.axis_name)


def max_classes(x, options: RuleOptions):
    top = jnp.max(x, axis=-1, keepdims=True)
    return top if options.axis_name is None else lax.pmax(top, options.axis_name)


def total_classes(num_local: int, options: RuleOptions):
    """``C``: the classes of the whole row, across vocabulary shards."""
    return num_local if options.axis_name is None else lax.psum(num_local, options.axis_name)


def class_index(num_local: int, ndim: int, options: RuleOptions, block=None):
    """Global class index of each local class, shaped ``[1, ..., 1, C]``."""
    index = lax.broadcasted_iota(jnp.int32, (1,) * (ndim - 1) + (num_local,), ndim - 1)
    if options.axis_name is not None:
        index = index + lax.axis_index(options.axis_name) * num_local
    return index if block is None else index + block.offset


def per_class(vector, ndim: int, dtype):
    """A ``[C]`` vector shaped ``[1, ..., 1, C]`` to meet ``[..., C]`` arrays."""
    return vector.astype(dtype).reshape((1,) * (ndim - 1) + vector.shape)


def capped(logits, options: RuleOptions):
    """``x``: the logits in the compute dtype, soft-capped when asked, ``cap tanh(z / cap)``."""
    x = logits.astype(compute_dtype(logits.dtype))
    if options.logit_softcap is not None:
        x = options.logit_softcap * jnp.tanh(x / options.logit_softcap)
    return x


def row_statistics(x, class_mask, options: RuleOptions):
    """``m = max_c x_c`` and ``log_sum = log sum_c exp(x_c - m)`` per row, ``[..., 1]`` each.

    Masked classes take no part; a row without any gets ``m = 0``, ``log_sum = -inf`` (callers
    zero such rows). ``m`` is a constant of the derivative: the loss does not depend on it.
    """
    if class_mask is not None:
        x = jnp.where(class_mask, x, -jnp.inf)
    top = max_classes(x, options)
    top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    log_sum = jnp.log(sum_classes(jnp.exp(x - top), options))
    return top, log_sum


def num_participating(class_mask, num_local, dtype, options: RuleOptions, block=None):
    """``K``: the classes taking part in each row (at least 1, to divide by)."""
    if class_mask is None:
        count = total_classes(num_local, options) if block is None else block.num_classes
        count = count if block is None or block.participating is None else block.participating
        return jnp.asarray(count, dtype)
    return jnp.maximum(sum_classes(class_mask.astype(dtype), options), 1.0)


def smoothing_vector(class_mask, class_weights, num_local, ndim, dtype, options, block=None):
    """The smoothing part of ``q``, ``eps w_c / K`` on participating classes (0 elsewhere);
    None without label smoothing."""
    if not options.label_smoothing:
        return None
    weights = 1.0 if class_weights is None else per_class(class_weights, ndim, dtype)
    k = num_participating(class_mask, num_local, dtype, options, block)
    smoothing = weights * (options.label_smoothing / k)
    return smoothing if class_mask is None else jnp.where(class_mask, smoothing, 0.0)


def target_vector(targets, class_mask, class_weights, num_local, dtype, options, block=None):
    """``q_c = w_c ((1 - eps) y_c + eps / K)``, ``[..., C]`` (a tile's slice with ``block``).

    ``y`` is one-hot for integer targets, whose own class always counts (as in optax);
    masked classes get no probability and no smoothing mass.
    """
    ndim = targets.ndim + 1 if is_indices(targets) else targets.ndim
    if is_indices(targets):
        index = class_index(num_local, ndim, options, block)
        y = (index == targets[..., None].astype(jnp.int32)).astype(dtype)
    else:
        y = targets.astype(dtype)
        y = y if class_mask is None else jnp.where(class_mask, y, 0.0)
    weights = 1.0 if class_weights is None else per_class(class_weights, ndim, dtype)
    q = (1.0 - options.label_smoothing) * weights * y
    smoothing = smoothing_vector(class_mask, class_weights, num_local, ndim, dtype, options, block)
    return q if smoothing is None else q + smoothing


def at_label(values, targets, options: RuleOptions):
    """``values[..., label]`` per row, ``[..., 1]``, for ``[..., C]`` or ``[C]`` values; when
    sharded, the shard that owns the label contributes to a ``psum``, the others add 0."""
    num_local = values.shape[-1]
    index = targets.astype(jnp.int32)
    if options.axis_name is not None:
        index = index - lax.axis_index(options.axis_name) * num_local
    owned = (index >= 0) & (index < num_local)
    index = jnp.clip(index, 0, num_local - 1)
    if values.ndim == 1:
        picked = jnp.take(values, index)[..., None]
    else:
        picked = jnp.take_along_axis(values, index[..., None], axis=-1)
    if options.axis_name is None:
        return picked
    return lax.psum(jnp.where(owned[..., None], picked, 0), options.axis_name)


def row_weight(targets, class_weights, num_local, dtype, options: RuleOptions):
    """``r``: ``w[label]`` for integer targets with class weights, else 1."""
    if not is_indices(targets) or class_weights is None:
        return jnp.asarray(1.0, dtype)
    return at_label(class_weights.astype(dtype), targets, options)


def target_total(targets, class_mask, class_weights, num_local, dtype, options, block=None):
    """``Q = sum_c q_c`` per row (``[..., 1]`` or a scalar).

    Integer targets: ``(1 - eps) w[label] + eps (sum of participating w) / K``, exactly 1
    without class weights. Probabilities: a sum over the classes.
    """
    if not is_indices(targets):
        q = target_vector(targets, class_mask, class_weights, num_local, dtype, options)
        return sum_classes(q, options)
    if class_weights is None:
        return jnp.asarray(1.0, dtype)
    if block is not None:
        class_weights, num_local = block.class_weights, block.num_classes
    eps = options.label_smoothing
    total = (1.0 - eps) * row_weight(targets, class_weights, num_local, dtype, options)
    if eps:
        w = per_class(class_weights, targets.ndim + 1, dtype)
        w = w if class_mask is None else jnp.where(class_mask, w, 0.0)
        k = num_participating(class_mask, num_local, dtype, options, block)
        total = total + eps * sum_classes(w, options) / k
    return total


def live_rows(class_mask, row_mask, options: RuleOptions):
    """Rows taking part (bool ``[..., 1]``; None: all), not dropped, with a class left."""
    live = None
    if class_mask is not None:
        live = jnp.any(class_mask, axis=-1, keepdims=True)
        if options.axis_name is not None:
            live = lax.psum(live.astype(jnp.int32), options.axis_name) > 0
    if row_mask is not None:
        live = row_mask[..., None] if live is None else live & row_mask[..., None]
    return live


def bad_label_rows(targets, row_mask, num_local, options: RuleOptions):
    """Integer labels outside ``[0, C)`` on rows that take part (bool ``[..., 1]``), or None.
    They cannot raise under ``jit``: their loss and gradient become NaN, not a plausible number.
    """
    if not is_indices(targets):
        return None
    num_classes = jnp.asarray(total_classes(num_local, options), targets.dtype)
    bad = (targets < 0) | (targets >= num_classes)
    return (bad if row_mask is None else bad & row_mask)[..., None]


def label_cross_entropy(log_sum, label_shifted, smoothing_sum, r, k, options: RuleOptions):
    """``sum_c q_c (log_sum - (x_c - m))`` for an integer label, from per-row numbers::

        (1 - eps) r (log_sum - (x_label - m)) + eps / K sum_c w_c (log_sum - (x_c - m))

    ``smoothing_sum`` is that last sum over the participating classes (unused at eps = 0).
    """
    cross = (1.0 - options.label_smoothing) * r * (log_sum - label_shifted)
    if options.label_smoothing:
        cross = cross + options.label_smoothing * smoothing_sum / k
    return cross


def row_loss(statistics, cross_entropy, r, live, bad, options: RuleOptions):
    """The per-row loss, ``[...]``, from the row's cross-entropy term::

        loss = sum_c q_c (lse - x_c) + beta r lse^2,    lse = m + log_sum

    ``cross_entropy`` is the first sum, ``[..., 1]``. Rows not ``live`` give 0, rows with a
    ``bad`` label NaN.
    """
    loss = cross_entropy
    if options.z_loss:
        lse = statistics[0] + statistics[1]
        # beta * lse first: lse**2 alone overflows float32 past |lse| ~ 1.8e19.
        loss = loss + options.z_loss * lse * lse * r
    if live is not None:
        loss = jnp.where(live, loss, 0.0)
    if bad is not None:
        loss = jnp.where(bad, jnp.nan, loss)
    return loss[..., 0]


def forward(logits, targets, class_mask, class_weights, row_mask, options: RuleOptions):
    """Per-row loss ``[...]`` and the residuals ``(m, log_sum)`` the backward needs."""
    num_local = logits.shape[-1]
    x = capped(logits, options)
    top, log_sum = statistics = row_statistics(x, class_mask, options)
    q = target_vector(targets, class_mask, class_weights, num_local, x.dtype, options)
    # Classes without target mass are skipped, so -inf logits there give 0, not 0 * inf.
    per_class_loss = jnp.where(q != 0, q * (log_sum - (x - top)), 0.0)
    cross = sum_classes(per_class_loss, options)
    r = row_weight(targets, class_weights, num_local, x.dtype, options)
    live = live_rows(class_mask, row_mask, options)
    bad = bad_label_rows(targets, row_mask, num_local, options)
    return row_loss(statistics, cross, r, live, bad, options), statistics


def gradient_expression(x, q, scale, statistics, row_g, taking_part, options: RuleOptions):
    """The backward expression, elementwise given the per-row numbers::

        dL/dz = (scale * softmax(x) - q) * g * (1 - (x / cap)^2)

    with ``scale = sum_c q_c + 2 beta r lse`` and ``softmax(x) = exp(x - m) * exp(-log_sum)``
    (the forward's own exponential). Classes not ``taking_part`` get no probability.
    """
    top, log_sum = statistics
    exponent = x if taking_part is None else jnp.where(taking_part, x, -jnp.inf)
    softmax = jnp.exp(exponent - top) * jnp.exp(-log_sum)
    grad = (scale * softmax - q) * row_g
    if options.logit_softcap is not None:
        grad = grad * (1.0 - (x / options.logit_softcap) ** 2)
    return grad


def gradient_scale(targets, class_mask, class_weights, num_local, statistics, dtype, options,
                   block=None):  # fmt: skip
    """``sum_c q_c + 2 beta r lse`` per row: the softmax's coefficient in the gradient."""
    scale = target_total(targets, class_mask, class_weights, num_local, dtype, options, block)
    if options.z_loss:
        if block is not None:
            class_weights, num_local = block.class_weights, block.num_classes
        r = row_weight(targets, class_weights, num_local, dtype, options)
        scale = scale + 2.0 * options.z_loss * r * (statistics[0] + statistics[1])
    return scale


def row_cotangent(g, live, bad, dtype):
    """``g`` per row, ``[..., 1]``: 0 on rows that do not take part, NaN on bad labels."""
    row_g = g.astype(dtype)[..., None]
    if live is not None:
        row_g = jnp.where(live, row_g, 0.0)
    return row_g if bad is None else jnp.where(bad, jnp.nan, row_g)


def logits_gradient(logits, targets, class_mask, class_weights, row_mask, statistics, g,
                    options: RuleOptions, block: ClassBlock | None = None):  # fmt: skip
    """``dL/dz`` for the per-row cotangent ``g``, by :func:`gradient_expression`.

    ``statistics`` are the forward's residuals ``(m, log_sum)``. With a :class:`ClassBlock`,
    ``logits`` and ``class_weights`` are one tile of the row's classes and the result is that
    tile of the gradient (the expression is elementwise given the per-row numbers).
    """
    num_local, num_total = logits.shape[-1], logits.shape[-1]
    if block is not None:
        num_total = block.num_classes
    x = capped(logits, options)
    live = live_rows(class_mask, row_mask, options)
    if live is not None:  # rows without a class: log_sum = -inf, kept finite here
        statistics = (statistics[0], jnp.where(live, statistics[1], 0.0))
    q = target_vector(targets, class_mask, class_weights, num_local, x.dtype, options, block)
    scale = gradient_scale(
        targets, class_mask, class_weights, num_local, statistics, x.dtype, options, block
    )
    row_g = row_cotangent(g, live, bad_label_rows(targets, row_mask, num_total, options), x.dtype)
    grad = gradient_expression(x, q, scale, statistics, row_g, class_mask, options)
    return grad.astype(logits.dtype)


def probabilities_gradient(logits, targets, class_mask, class_weights, row_mask, statistics,
                           g, options: RuleOptions):  # fmt: skip
    """The gradient with respect to probability targets (for distillation):
    ``dL/dy_c = -(1 - eps) w_c log softmax(x)_c * g``, 0 on masked classes."""
    x = capped(logits, options)
    top, log_sum = statistics
    live = live_rows(class_mask, row_mask, options)
    if live is not None:
        log_sum = jnp.where(live, log_sum, 0.0)
    weights = 1.0 if class_weights is None else per_class(class_weights, x.ndim, x.dtype)
    row_g = row_cotangent(g, live, None, x.dtype)
    grad = -(1.0 - options.label_smoothing) * weights * (x - top - log_sum) * row_g
    grad = grad if class_mask is None else jnp.where(class_mask, grad, 0.0)
    return grad.astype(targets.dtype)

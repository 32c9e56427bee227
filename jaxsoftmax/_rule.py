"""The derived rule: softmax cross-entropy forward and its hand-written backward.

The one place where every public loss is defined and differentiated, for class-last logits
(the public functions move axes and validate first). Plain JAX, the program GPUs and TPUs
compile; XLA's CPU backend gets equal programs from :mod:`jaxsoftmax._cpu_fast_paths`. The
fused and sharded losses build on :func:`capped`, :func:`row_statistics`,
:func:`label_cross_entropy` and :func:`row_loss` (the forward from per-row numbers), and
:func:`logits_gradient` with a :class:`ClassBlock` (one tile of the backward).

The rule
--------
For one row of logits ``z`` (``C`` classes), ``s = softmax(z)`` and a target vector ``q``
(a distribution, or a weighted / smoothed one that need not sum to one)::

    loss = -sum_c q_c log s_c = sum_c q_c (lse(z) - z_c)        lse(z) = log sum_k exp z_k

The softmax Jacobian is ``ds_i/dz_j = s_i (delta_ij - s_j)``, so the chain rule through the
log gives ``dloss/dz_j = -sum_i q_i (delta_ij - s_j) = s_j sum_i q_i - q_j``: for targets
that sum to one, ``s - q`` (the derivation in docs/derivation.md). With an upstream
cotangent ``g`` (a mean over N examples passes ``g = 1/N``) every row is multiplied by
``g``. Each option only changes ``q``, adds a term, or multiplies by a derivative:

* class weights ``w`` and label smoothing ``eps`` over ``K`` participating classes:
  ``q_c = w_c ((1 - eps) y_c + eps / K)`` (PyTorch's definition, with ``y`` one-hot for
  integer labels),
* z-loss (PaLM) adds ``beta * r * lse^2`` per row (``r`` is the row's weight, ``w[label]``
  for integer labels, else 1), whose gradient is ``2 beta r lse * s``,
* a logit soft cap (Gemma 2) feeds ``x = cap * tanh(z / cap)`` to the softmax; its
  derivative ``1 - tanh(z / cap)^2 = 1 - (x / cap)^2`` multiplies the gradient elementwise.

Together, the backward expression (:func:`gradient_expression`) is::

    dloss/dz = ((sum_c q_c + 2 beta r lse) * s - q) * g * (1 - tanh(z / cap)^2)

Residuals: the logits (alive anyway in a training step) and two numbers per row, the row
maximum ``m`` and ``log_sum = log sum_k exp(x_k - m)``, kept apart so the softmax stays exact
at huge logits (at ``|z| ~ 1e30`` in float32 ``lse`` rounds to ``m``). The backward computes
``s = exp(x - m) * exp(-log_sum)``, the forward's own exponential, computed once per logit
in a program that holds both (``jit`` of ``value_and_grad``). bf16 and f16 are computed in
float32; float64 stays float64. With ``axis_name`` the class axis is split over that mapped
axis and every sum or maximum over it ends in a ``psum`` / ``pmax`` of per-row values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax import _cpu_fast_paths as fast
from jaxsoftmax._varying_axes import whole_cotangent


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


# The custom rule. Every platform gets the plain functions above but XLA's CPU backend,
# which gets the equal programs of `_cpu_fast_paths` when the program is lowered for it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def softmax_cross_entropy_rows(logits, targets, class_mask, class_weights, row_mask,
                               options: RuleOptions):  # fmt: skip
    """Per-row loss ``[...]`` for class-last ``logits [..., C]``, differentiated by the rule.

    ``targets`` are integer labels ``[...]`` or probabilities ``[..., C]``; ``class_mask``
    (bool ``[..., C]``), ``class_weights`` (``[C]``, a constant) and ``row_mask`` (bool
    ``[...]``) may be None.
    """
    return _rows_fwd(logits, targets, class_mask, class_weights, row_mask, options)[0]


def _rows_fwd(logits, targets, class_mask, class_weights, row_mask, options):
    forward_here = fast.per_platform(forward, fast.forward, options=options)
    loss, statistics = forward_here(logits, targets, class_mask, class_weights, row_mask)
    return loss, (logits, targets, class_mask, class_weights, row_mask, statistics)


def _rows_bwd(options, residuals, g):
    logits, targets, class_mask, class_weights, row_mask, statistics = residuals
    g = whole_cotangent(g, logits, options.axis_name)
    gradient_here = fast.per_platform(logits_gradient, fast.logits_gradient, options=options)
    d_logits = gradient_here(logits, targets, class_mask, class_weights, row_mask, statistics, g)
    d_targets = None
    if not is_indices(targets):
        d_targets = probabilities_gradient(
            logits, targets, class_mask, class_weights, row_mask, statistics, g, options
        )
    d_weights = None if class_weights is None else jnp.zeros_like(class_weights)
    return d_logits, d_targets, None, d_weights, None


softmax_cross_entropy_rows.defvjp(_rows_fwd, _rows_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def softmax_cross_entropy_rows_fwd_capable(logits, targets, class_mask, class_weights,
                                           row_mask, options: RuleOptions):  # fmt: skip
    """:func:`softmax_cross_entropy_rows` with forward-mode support.

    The tangent is the rule's gradient dotted with the input tangents,
    ``dL = <dL/dz, dz> + <dL/dy, dy>``. Reverse mode transposes that tangent: the gradients
    are rematerialized (``jax.checkpoint``, without its optimization barrier) so that the
    residuals are the logits and the per-row statistics, as in the custom_vjp.
    """
    return _rows_fwd(logits, targets, class_mask, class_weights, row_mask, options)[0]


def _rows_jvp(options, primals, tangents):
    logits, targets, class_mask, class_weights, row_mask = primals
    loss, (*_, statistics) = _rows_fwd(*primals, options)
    d_logits, d_targets = (None if type(t) is jax.custom_derivatives.SymbolicZero else t
                           for t in tangents[:2])  # fmt: skip
    d_targets = None if is_indices(targets) else d_targets

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def tangent(residuals, d_logits, d_targets):
        ones = jnp.ones(loss.shape, loss.dtype)
        gradients = (fast.per_platform(logits_gradient, fast.logits_gradient, options=options),
                     functools.partial(probabilities_gradient, options=options))  # fmt: skip
        out = jnp.zeros(loss.shape, loss.dtype)
        for gradient, dx in zip(gradients, (d_logits, d_targets)):
            if dx is not None:
                grad = gradient(*residuals, ones).astype(loss.dtype)
                out = out + jnp.sum(grad * dx.astype(loss.dtype), -1)
        return out if options.axis_name is None else lax.psum(out, options.axis_name)

    residuals = (logits, targets, class_mask, class_weights, row_mask, statistics)
    return loss, tangent(residuals, d_logits, d_targets)


softmax_cross_entropy_rows_fwd_capable.defjvp(_rows_jvp, symbolic_zeros=True)

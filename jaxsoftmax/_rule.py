"""The derived rule: softmax cross-entropy forward and its hand-written backward.

This module is the one place where the loss of every public function is computed and
differentiated. Everything is written for logits whose class axis is the *last* axis;
the public functions move axes and validate arguments before they call in here.

The rule
--------
For one row of logits ``z`` (``C`` classes), ``s = softmax(z)`` and a target vector ``q``
(a distribution, or a weighted / smoothed one that need not sum to one)::

    loss = -sum_c q_c log s_c = sum_c q_c (lse(z) - z_c)        lse(z) = log sum_k exp z_k

The softmax Jacobian is ``ds_i/dz_j = s_i (delta_ij - s_j)``, so the chain rule through the
log gives ``dloss/dz_j = -sum_i q_i (delta_ij - s_j) = s_j sum_i q_i - q_j``; for targets
that sum to one this collapses to the seeds' result ``s - q``. With an upstream
cotangent ``g`` (a mean over N examples passes ``g = 1/N``) every row is multiplied by
``g``. Each option only changes ``q``, adds a term, or multiplies by a derivative:

* class weights ``w`` and label smoothing ``eps`` over ``K`` participating classes:
  ``q_c = w_c ((1 - eps) y_c + eps / K)`` (PyTorch's definition, with ``y`` one-hot for
  integer labels),
* z-loss (PaLM) adds ``beta * r * lse^2`` per row (``r`` is the row's weight, ``w[label]``
  for integer labels, else 1), whose gradient is ``2 beta r lse * s``,
* a logit soft cap (Gemma 2) feeds ``cap * tanh(z / cap)`` to the softmax; its derivative
  ``1 - tanh(z / cap)^2`` multiplies the gradient elementwise.

Together, the backward expression (:func:`_logits_gradient`) is::

    dloss/dz = ((sum_c q_c + 2 beta r lse) * s - q) * g * (1 - tanh(z / cap)^2)

For integer labels (float32/float64 logits) the one-hot part of ``q`` lives at one class per row: the expression is
written for every class with ``q``'s smoothing part, and each row's label entry is then set
to the expression evaluated there with its whole ``q`` (a scatter, in place once compiled).

Residuals
---------
The forward keeps the logits (alive anyway in a training step) and two numbers per row:
the row maximum ``m`` and ``log_sum = log sum_k exp(z_k - m)``. Keeping ``m`` and
``log_sum`` apart rather than their sum ``lse`` keeps the softmax exact at huge logits:
at ``|z| ~ 1e30`` in float32, ``lse`` rounds to ``m`` and ``exp(z - lse)`` would lose the
``log_sum`` entirely. The backward computes ``softmax = exp(z - m) * exp(-log_sum)``, so tied
maxima get ``1 / k`` each. No second array of the logits' size is saved; the softmax is
recomputed in the backward.

``exp(z - m)`` is the forward's own exponential, written the same way (``m`` is the same
value, masked classes are ``-inf`` in both), so when forward and backward are compiled
together (``jit`` of ``value_and_grad``) XLA computes it once per logit: it writes it where
the gradient goes, sums it for ``log_sum`` and finishes the gradient in place, as autodiff
of optax's loss does. Compiled apart (``jax.vjp``, remat), the backward computes it again.

Precision: bf16 and f16 logits are computed in float32 and the gradient is cast back to
the logits' dtype; float64 stays float64 under ``jax_enable_x64``.

Vocabulary sharding: with ``axis_name`` set, the class axis is split over that mapped axis
(``shard_map`` / ``pmap``). Each shard reduces its own classes and the rows' statistics
are combined with ``pmax`` / ``psum`` of per-row values only. For integer labels without
class weights the backward needs nothing beyond its residuals; class weights or probability
targets make it recompute ``sum_c q_c`` with one more per-row ``psum`` (``docs/scaling.md``
lists each case). Where values are not vma-typed (``pmap``, ``shard_map(check_vma=False)``)
the cotangent also takes a per-row ``psum``, see :func:`_whole_cotangent`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class RuleOptions:
    """The static (non-differentiable, hashable) options of the rule.

    Attributes:
      label_smoothing: ``eps`` in ``q = w ((1 - eps) y + eps / K)``.
      z_loss: ``beta`` in the added ``beta * r * lse^2`` per row.
      logit_softcap: ``cap`` in ``cap * tanh(z / cap)``, or None for no cap.
      axis_name: mapped axis the class axis is split over, or None.
    """

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    axis_name: object | None = None


class ClassBlock(NamedTuple):
    """Classes ``[offset, offset + width)`` out of ``num_classes``: one chunk of a row.

    For callers that visit the class axis in chunks and never hold a whole row of logits
    (:mod:`jaxsoftmax._linear_cross_entropy`). The rule is then given the chunk's logits and
    the chunk's slice of the class weights; the one-hot uses global class indices
    ``offset + j``, smoothing spreads over all ``num_classes`` and the per-row numbers
    (``w[label]``, ``sum_c w_c``, the label range) use ``class_weights``, all ``C`` of them.
    Integer targets only, without a class mask, and with ``axis_name=None``: a caller with a
    vocabulary-split classifier (:mod:`jaxsoftmax._sharded_linear`) passes the chunk's
    *global* offset and all ``C`` class weights, so no tile needs communication.

    Attributes:
      offset: global index of the chunk's first class (may be traced).
      num_classes: ``C``, the number of classes of the whole row.
      class_weights: all ``C`` class weights, or None.
    """

    offset: object
    num_classes: int
    class_weights: jax.Array | None = None


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/f16/f32 logits, float64 for float64 logits."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype).itemsize > 4 else jnp.dtype(jnp.float32)


def _sum_classes(x, options: RuleOptions):
    """Sum over the (possibly sharded) class axis, keeping it as size 1."""
    total = jnp.sum(x, axis=-1, keepdims=True)
    if options.axis_name is not None:
        total = lax.psum(total, options.axis_name)
    return total


def _max_classes(x, options: RuleOptions):
    top = jnp.max(x, axis=-1, keepdims=True)
    if options.axis_name is not None:
        top = lax.pmax(top, options.axis_name)
    return top


def _class_index(num_local: int, ndim: int, options: RuleOptions):
    """Global class index of each local class (shard offset + position), ``[1, ..., 1, C]``."""
    shape = (1,) * (ndim - 1) + (num_local,)
    local = lax.broadcasted_iota(jnp.int32, shape, ndim - 1)
    if options.axis_name is None:
        return local
    return local + lax.axis_index(options.axis_name) * num_local


def _per_class(vector, ndim: int, dtype):
    """A ``[C]`` vector shaped ``[1, ..., 1, C]`` to meet ``[..., C]`` arrays (no rank promotion)."""
    return vector.astype(dtype).reshape((1,) * (ndim - 1) + vector.shape)


def _is_widened(logits) -> bool:
    """bf16/f16 logits, which the rule computes in float32 (:func:`compute_dtype`)."""
    return jnp.dtype(logits.dtype) != compute_dtype(logits.dtype)


def _capped(logits, options: RuleOptions):
    """Logits in the compute dtype, soft-capped when asked: ``cap * tanh(z / cap)``."""
    x = logits.astype(compute_dtype(logits.dtype))
    if options.logit_softcap is not None:
        cap = options.logit_softcap
        x = cap * jnp.tanh(x / cap)
    return x


def _separate_readers(logits):
    """Two names for bf16/f16 logits: one for the forward's reductions, one for its other passes.

    XLA's CPU backend widens narrow logits inside the exponential's pass only when that pass is
    the one reader of the widened array. A second reader (the label gather, the smoothing or
    target sum, or the backward's widening, which XLA merges with the forward's when both are
    compiled together) makes it write a float32 copy of the whole logits first: twice their
    bytes of temporary memory, and at [4096, 32768] two and a half times as long to write as
    both reductions take to run. An optimization barrier is an identity XLA cannot see
    through, so each reader keeps its own name; nothing is copied.
    """
    for_statistics = lax.optimization_barrier(logits)
    return for_statistics, lax.optimization_barrier(for_statistics)


def _shifted_again(logits, top, options: RuleOptions):
    """``_capped(logits) - top`` for one more pass over the classes, from names of its own.

    Shared with the sum of exponentials, ``x - top`` (or, once each pass widens by itself,
    the broadcast of ``top`` to the logits' shape) is written out whole for both passes to
    read; behind one more barrier each pass computes its own (see :func:`_separate_readers`).
    """
    logits, top = lax.optimization_barrier((logits, top))
    return _capped(logits, options) - top


def _row_statistics(logits, x, class_mask, options: RuleOptions):
    """Row maximum ``m``, ``log_sum = log sum exp(x - m)`` and shifted logits ``x - m``.

    ``x`` is ``_capped(logits)``. Without a soft cap it is the logits widened (bf16 and f16 to
    float32, exactly and in order), so ``max(x) = widen(max(logits))``: the maximum is taken
    over the logits as they are, a pass over half the bytes for narrow logits.

    Masked classes take no part. A row with no participating class gets ``m = 0`` and
    ``log_sum = -inf``; callers zero such rows.
    """
    if options.logit_softcap is not None:
        logits = x
    if class_mask is not None:
        x = jnp.where(class_mask, x, -jnp.inf)
        logits = jnp.where(class_mask, logits, -jnp.inf)
    top = _max_classes(logits, options).astype(x.dtype)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    top = lax.stop_gradient(top)
    shifted = x - top
    log_sum = jnp.log(_sum_classes(jnp.exp(shifted), options))
    return top, log_sum, shifted


def _is_indices(targets) -> bool:
    return jnp.issubdtype(targets.dtype, jnp.integer)


def _at_label(values, targets, options: RuleOptions):
    """``values[..., label]`` per row, shape ``[..., 1]``, for ``[..., C]`` or ``[C]`` values.

    Under vocabulary sharding only the shard that owns the label contributes (the others
    add 0 to a ``psum``): one number per row crosses devices. Out-of-range labels read a
    clipped position; the rule marks their rows NaN elsewhere.
    """
    num_local = values.shape[-1]
    index = targets.astype(jnp.int32)
    if options.axis_name is not None:
        index = targets - lax.axis_index(options.axis_name) * num_local
    owned = (index >= 0) & (index < num_local)
    index = jnp.clip(index, 0, num_local - 1)
    if values.ndim == 1:
        picked = jnp.take(values, index)[..., None]
    else:
        picked = jnp.take_along_axis(values, index[..., None], axis=-1)
    if options.axis_name is None:
        return picked
    return lax.psum(jnp.where(owned[..., None], picked, 0), options.axis_name)


def _target_vector(
    targets,
    class_mask,
    class_weights,
    num_local,
    dtype,
    options: RuleOptions,
    block: ClassBlock | None = None,
):
    """The effective target vector ``q_c = w_c ((1 - eps) y_c + eps / K)``, ``[..., C]``.

    ``K`` counts the classes taking part in the row and masked classes get no smoothing
    mass; ``y`` is one-hot for integer targets, whose own class always counts (as in optax).
    With a :class:`ClassBlock`, ``q`` is the chunk's slice of the row's target vector.
    """
    eps = options.label_smoothing
    ndim = targets.ndim + 1 if _is_indices(targets) else targets.ndim
    weights = 1.0 if class_weights is None else _per_class(class_weights, ndim, dtype)
    if _is_indices(targets):
        index = _class_index(num_local, ndim, options)
        if block is not None:
            index = index + block.offset
        y = (index == targets[..., None].astype(jnp.int32)).astype(dtype)
    else:
        y = targets.astype(dtype)
        if class_mask is not None:
            y = jnp.where(class_mask, y, 0.0)
    q = (1.0 - eps) * weights * y
    smoothing = _smoothing_vector(class_mask, class_weights, num_local, ndim, dtype, options, block)
    return q if smoothing is None else q + smoothing


def _smoothing_vector(
    class_mask, class_weights, num_local, ndim, dtype, options: RuleOptions, block=None
):
    """The smoothing part of ``q``, ``eps w_c / K`` on participating classes (0 elsewhere),
    ``[..., C]`` or broadcastable to it; None without label smoothing."""
    if not options.label_smoothing:
        return None
    weights = 1.0 if class_weights is None else _per_class(class_weights, ndim, dtype)
    smoothing = weights * _smoothing_per_weight(class_mask, num_local, dtype, options, block)
    if class_mask is not None:
        smoothing = jnp.where(class_mask, smoothing, 0.0)
    return smoothing


def _smoothing_per_weight(class_mask, num_local, dtype, options: RuleOptions, block=None):
    """``eps / K``: the smoothing mass per unit of class weight (per row, or a scalar)."""
    num_classes = num_local if block is None else block.num_classes
    return options.label_smoothing / _num_participating(class_mask, num_classes, dtype, options)


def _local_label(targets, num_local: int, options: RuleOptions, block: ClassBlock | None):
    """Each row's label as an index into this tile's classes, and whether the tile holds it.

    The tile is the whole row, one vocabulary shard (``axis_name``) or one chunk (``block``).
    """
    index = targets.astype(jnp.int32)
    if options.axis_name is not None:
        index = index - lax.axis_index(options.axis_name) * num_local
    if block is not None:
        index = index - block.offset
    return index, (index >= 0) & (index < num_local)


def _set_at_label(values, index, owned, label_values):
    """``values`` ``[..., C]`` with ``label_values[..., 0]`` written at each owned row's label.

    A scatter of one entry per row into ``values`` (in place once compiled); rows whose label
    lies outside this tile are left as they are.
    """
    num_local = values.shape[-1]
    columns = jnp.where(owned, index, num_local)  # num_local: out of bounds, dropped
    set_one = lambda row, column, value: row.at[column].set(value, mode="drop")
    # Rows as a batch dimension of the scatter (not explicit row indices), so that a batch
    # split over devices stays split: the SPMD partitioner keeps batch dimensions local.
    for _ in range(values.ndim - 1):
        set_one = jax.vmap(set_one)
    return set_one(values, columns, label_values[..., 0])


def _num_participating(class_mask, num_local, dtype, options: RuleOptions):
    """``K``: the classes taking part in each row (at least 1, to divide by)."""
    if class_mask is None:
        count = num_local if options.axis_name is None else lax.psum(num_local, options.axis_name)
        return jnp.asarray(count, dtype)
    return jnp.maximum(_sum_classes(class_mask.astype(dtype), options), 1.0)


def _target_total(targets, class_mask, class_weights, num_local, dtype, options: RuleOptions):
    """``sum_c q_c`` per row (``[..., 1]`` or a scalar), without building ``q`` if avoidable.

    Integer targets: ``(1 - eps) w[label] + eps * (sum of participating w) / K``, which is
    exactly 1 without class weights. Probabilities: a sum over the classes.
    """
    eps = options.label_smoothing
    if not _is_indices(targets):
        q = _target_vector(targets, class_mask, class_weights, num_local, dtype, options)
        return _sum_classes(q, options)
    if class_weights is None:
        return jnp.asarray(1.0, dtype)
    weights = _per_class(class_weights, targets.ndim + 1, dtype)
    total = (1.0 - eps) * _at_label(class_weights.astype(dtype), targets, options)
    if eps:
        participating = weights if class_mask is None else jnp.where(class_mask, weights, 0.0)
        total = total + eps * _sum_classes(participating, options) / _num_participating(
            class_mask, num_local, dtype, options
        )
    return total


def row_weight(targets, class_weights, num_local, dtype, options: RuleOptions):
    """``r``: ``w[label]`` for integer targets with class weights, else 1."""
    if not _is_indices(targets) or class_weights is None:
        return jnp.asarray(1.0, dtype)
    return _at_label(class_weights.astype(dtype), targets, options)


def live_rows(class_mask, row_mask, options: RuleOptions):
    """Rows that take part (bool ``[..., 1]``), or None when all do.

    A row is dropped when ``row_mask`` says so or when ``class_mask`` leaves it no class;
    dropped rows give a zero loss and a zero gradient.
    """
    live = None
    if class_mask is not None:
        # Reduced with `any` on each shard, then counted across shards: a sum over the classes
        # of the mask as integers makes XLA's CPU backend write those integers out first.
        local = jnp.any(class_mask, axis=-1, keepdims=True)
        live = _sum_classes(local.astype(jnp.int32), options) > 0
    if row_mask is not None:
        live = row_mask[..., None] if live is None else live & row_mask[..., None]
    return live


def _bad_label_rows(targets, row_mask, num_local, options: RuleOptions):
    """Integer labels outside ``[0, C)`` on rows that take part (bool ``[..., 1]``).

    Such rows cannot raise under ``jit``; the rule turns their loss and gradient into NaN
    so the error shows instead of hiding as a plausible number.
    """
    if not _is_indices(targets):
        return None
    num_total = num_local
    if options.axis_name is not None:
        num_total = lax.psum(num_local, options.axis_name)
    bad = (targets < 0) | (targets >= jnp.asarray(num_total, targets.dtype))
    if row_mask is not None:
        bad = bad & row_mask
    return bad[..., None]


def _forward(logits, targets, class_mask, class_weights, row_mask, options: RuleOptions):
    """Per-row loss and the residuals the backward needs (two numbers per row).

    ``loss = sum_c q_c (lse - z_c) = sum_c q_c (log_sum - (z_c - m))``. For integer targets
    the one-hot part is a gather, ``(1 - eps) w[label] (log_sum - (z_label - m))``; only
    label smoothing needs a second pass over the classes.
    """
    num_local = logits.shape[-1]
    widened_only = options.logit_softcap is None and _is_widened(logits)
    if widened_only:
        logits, other_passes = _separate_readers(logits)
    x = _capped(logits, options)
    dtype = x.dtype
    top, log_sum, shifted = _row_statistics(logits, x, class_mask, options)
    eps = options.label_smoothing
    if widened_only and (eps or not _is_indices(targets)):
        # The smoothing or target sum below computes its own (unmasked) shifted logits.
        shifted = _shifted_again(other_passes, top, options)
    if _is_indices(targets):
        # The label's own logit counts even where class_mask drops it (optax's semantics).
        label_logit = _at_label(other_passes if widened_only else x, targets, options)
        label_shifted = label_logit.astype(dtype) - top
        loss = (
            (1.0 - eps)
            * row_weight(targets, class_weights, num_local, dtype, options)
            * (log_sum - label_shifted)
        )
        if eps:
            weights = 1.0 if class_weights is None else _per_class(class_weights, x.ndim, dtype)
            per_class = weights * (log_sum - shifted)
            if class_mask is not None:
                per_class = jnp.where(class_mask, per_class, 0.0)
            loss = loss + eps * _sum_classes(per_class, options) / _num_participating(
                class_mask, num_local, dtype, options
            )
    else:
        if widened_only:  # the backward widens bf16 targets too; merged, they are written out
            targets = lax.optimization_barrier(targets)
        q = _target_vector(targets, class_mask, class_weights, num_local, dtype, options)
        # Classes without target mass are skipped, so -inf logits there give 0, not 0 * inf.
        loss = _sum_classes(jnp.where(q != 0, q * (log_sum - shifted), 0.0), options)
    if options.z_loss:
        r = row_weight(targets, class_weights, num_local, dtype, options)
        lse = top + log_sum
        # beta * lse first: lse**2 alone overflows float32 past |lse| ~ 1.8e19, while the
        # term overflows only where its true value does.
        loss = loss + options.z_loss * lse * lse * r
    live = live_rows(class_mask, row_mask, options)
    if live is not None:
        loss = jnp.where(live, loss, 0.0)
    bad = _bad_label_rows(targets, row_mask, num_local, options)
    if bad is not None:
        loss = jnp.where(bad, jnp.nan, loss)
    return loss[..., 0], (top, log_sum)


def _logits_gradient(
    logits,
    targets,
    class_mask,
    class_weights,
    row_mask,
    statistics,
    g,
    options: RuleOptions,
    block: ClassBlock | None = None,
):
    """The derived backward rule, in one expression::

        dL/dz = ((sum_c q_c + 2 beta r lse) * softmax(z) - q) * g * (1 - tanh(z/cap)^2)

    ``statistics`` are the forward's residuals ``(m, log_sum)``; ``g`` is the per-row
    cotangent. Rows without participating classes or masked by ``row_mask`` get zero.
    With a :class:`ClassBlock`, ``logits`` and ``class_weights`` are one chunk of the row's
    classes and the result is that chunk of the row's gradient (the expression is
    elementwise given the row's statistics and ``sum_c q_c``).
    """
    num_local = logits.shape[-1]
    num_total, all_weights = num_local, class_weights
    if block is not None:
        assert class_mask is None and options.axis_name is None and _is_indices(targets)
        num_total, all_weights = block.num_classes, block.class_weights
    x = _capped(logits, options)
    dtype = x.dtype
    top, log_sum = statistics
    live = live_rows(class_mask, row_mask, options)
    if live is not None:
        log_sum = jnp.where(live, log_sum, 0.0)
    inverse_sum = jnp.exp(-log_sum)  # 1 / sum_k exp(x_k - m), per row
    if _is_widened(logits):
        # bf16/f16: each pass widens the logits itself (_separate_readers), the backward too.
        # Sharing the forward's broadcast of m would make XLA's CPU backend write it out whole.
        top = lax.optimization_barrier(top)
    scale = _target_total(targets, class_mask, all_weights, num_total, dtype, options)
    if options.z_loss:
        r = row_weight(targets, all_weights, num_total, dtype, options)
        scale = scale + 2.0 * options.z_loss * r * (top + log_sum)
    row_g = g.astype(dtype)[..., None]
    if live is not None:
        row_g = jnp.where(live, row_g, 0.0)
    bad = _bad_label_rows(targets, row_mask, num_total, options)
    if bad is not None:
        row_g = jnp.where(bad, jnp.nan, row_g)

    def rule(x, q, taking_part):
        """The expression, elementwise given the per-row ``scale``, ``m``, ``1 / sum`` and ``g``.

        ``softmax = exp(x - m) / sum`` with the forward's own ``exp(x - m)`` (see the module
        docstring, Residuals), computed once per logit in a program with the forward."""
        exponent = x if taking_part is None else jnp.where(taking_part, x, -jnp.inf)
        grad = (scale * (jnp.exp(exponent - top) * inverse_sum) - q) * row_g
        if options.logit_softcap is not None:
            grad = grad * (1.0 - (x / options.logit_softcap) ** 2)
        return grad

    if not _is_indices(targets) or _is_widened(logits):
        # Probability targets; or bf16/f16 logits, whose gradient XLA's CPU backend would
        # widen to float32 as a whole to scatter into it (it has no narrow-float scatter).
        q = _target_vector(targets, class_mask, class_weights, num_local, dtype, options, block)
        return rule(x, q, class_mask).astype(logits.dtype)

    # Integer labels: q is the smoothing part plus (1 - eps) w_y at the label. The tile gets
    # the rule with the smoothing part alone; the label's entry is then overwritten with the
    # rule evaluated at the label with its whole q (one entry per row, a scatter), rather
    # than comparing every class index with the label (which costs as much as the exponential).
    smoothing = _smoothing_vector(
        class_mask, class_weights, num_local, x.ndim, dtype, options, block
    )
    grad = rule(x, 0.0 if smoothing is None else smoothing, class_mask).astype(logits.dtype)
    index, owned = _local_label(targets, num_local, options, block)
    at_label = lambda values: jnp.take_along_axis(
        values, jnp.clip(index, 0, num_local - 1)[..., None], axis=-1
    )
    label_taking_part = None if class_mask is None else at_label(class_mask)
    eps = options.label_smoothing
    label_weight = row_weight(targets, all_weights, num_total, dtype, options)  # w_y, or 1
    q_label = (1.0 - eps) * label_weight
    if smoothing is not None:  # the smoothing vector's entry at the label, eps w_y / K
        spread = label_weight * _smoothing_per_weight(class_mask, num_local, dtype, options, block)
        if label_taking_part is not None:
            spread = jnp.where(label_taking_part, spread, 0.0)
        q_label = q_label + spread
    label_grad = rule(at_label(x), q_label, label_taking_part).astype(logits.dtype)
    return _set_at_label(grad, index, owned, label_grad)


def _probabilities_gradient(
    logits, targets, class_mask, class_weights, row_mask, statistics, g, options: RuleOptions
):
    """True gradient with respect to probability targets (for distillation).

    ``dL/dy_c = -(1 - eps) w_c log softmax(z)_c * g`` on participating classes, 0 elsewhere.
    """
    x = _capped(logits, options)
    dtype = x.dtype
    top, log_sum = statistics
    live = live_rows(class_mask, row_mask, options)
    row_g = g.astype(dtype)[..., None]
    if live is not None:
        log_sum = jnp.where(live, log_sum, 0.0)
        row_g = jnp.where(live, row_g, 0.0)
    log_softmax = x - top - log_sum
    weights = 1.0 if class_weights is None else _per_class(class_weights, x.ndim, dtype)
    grad = -(1.0 - options.label_smoothing) * weights * log_softmax * row_g
    if class_mask is not None:
        grad = jnp.where(class_mask, grad, 0.0)
    return grad.astype(targets.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def softmax_cross_entropy_rows(
    logits, targets, class_mask, class_weights, row_mask, options: RuleOptions
):
    """Per-row loss ``[...]`` for class-last ``logits [..., C]``, differentiated by the rule.

    Args:
      logits: float array ``[..., C]``.
      targets: integer labels ``[...]`` or float probabilities ``[..., C]``.
      class_mask: bool ``[..., C]`` (classes taking part) or None.
      class_weights: float ``[C]`` or None; treated as a constant (zero gradient).
      row_mask: bool ``[...]`` (rows taking part) or None; masked rows give 0.
      options: :class:`RuleOptions`.
    """
    return _forward(logits, targets, class_mask, class_weights, row_mask, options)[0]


def _rows_fwd(logits, targets, class_mask, class_weights, row_mask, options):
    loss, statistics = _forward(logits, targets, class_mask, class_weights, row_mask, options)
    return loss, (logits, targets, class_mask, class_weights, row_mask, statistics)


def _varying_axes(x) -> frozenset:
    """Mesh axes ``x`` is typed as varying over (shard_map's ``check_vma``), else empty."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # jax 0.6 - 0.8


def _whole_cotangent(g, logits, options: RuleOptions):
    """The per-row cotangent summed over the vocabulary shards' copies of the loss.

    Every shard holds the same per-row loss. Where shard_map types values
    (``check_vma=True``, its default) the logits vary over ``axis_name``, the loss does
    not, and ``g`` arrives whole on every shard. Without that typing (``pmap``,
    ``shard_map(check_vma=False)``) each shard's copy of the loss gets its own share of the
    cotangent (``g / S`` for a replicated output, or ``g`` on one shard and 0 on the
    others), and the true cotangent is their ``psum``: one number per row.
    """
    if options.axis_name is None:
        return g
    names = options.axis_name if isinstance(options.axis_name, tuple) else (options.axis_name,)
    if set(names) <= _varying_axes(logits):
        return g
    return lax.psum(g, options.axis_name)


def _rows_bwd(options, residuals, g):
    logits, targets, class_mask, class_weights, row_mask, statistics = residuals
    g = _whole_cotangent(g, logits, options)
    d_logits = _logits_gradient(
        logits, targets, class_mask, class_weights, row_mask, statistics, g, options
    )
    if _is_indices(targets):
        d_targets = None
    else:
        d_targets = _probabilities_gradient(
            logits, targets, class_mask, class_weights, row_mask, statistics, g, options
        )
    d_weights = None if class_weights is None else jnp.zeros_like(class_weights)
    return d_logits, d_targets, None, d_weights, None


softmax_cross_entropy_rows.defvjp(_rows_fwd, _rows_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def softmax_cross_entropy_rows_fwd_capable(
    logits, targets, class_mask, class_weights, row_mask, options: RuleOptions
):
    """:func:`softmax_cross_entropy_rows` with forward-mode support.

    The tangent is the derived gradient dotted with the input tangents,
    ``dL = <dL/dz, dz> + <dL/dy, dy>``, where both gradients come from the same rule
    functions the custom_vjp's backward calls. The gradient is rematerialized
    (``jax.checkpoint``) so that reverse mode, which transposes this tangent, saves the
    logits and the per-row statistics rather than a gradient-sized array.
    """
    return softmax_cross_entropy_rows(logits, targets, class_mask, class_weights, row_mask, options)


def _is_zero(tangent):
    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _rows_jvp(options, primals, tangents):
    logits, targets, class_mask, class_weights, row_mask = primals
    d_logits_in, d_targets_in = tangents[0], tangents[1]
    loss, statistics = _forward(logits, targets, class_mask, class_weights, row_mask, options)
    dtype = loss.dtype
    ones = jnp.ones(loss.shape, dtype)
    use_logits = not _is_zero(d_logits_in)
    use_targets = (not _is_indices(targets)) and not _is_zero(d_targets_in)

    @jax.checkpoint
    def tangent(logits, targets, statistics, d_logits_in, d_targets_in):
        out = jnp.zeros(loss.shape, dtype)
        if use_logits:
            grad = _logits_gradient(
                logits, targets, class_mask, class_weights, row_mask, statistics, ones, options
            )
            out = (
                out + _sum_classes(grad.astype(dtype) * d_logits_in.astype(dtype), options)[..., 0]
            )
        if use_targets:
            grad = _probabilities_gradient(
                logits, targets, class_mask, class_weights, row_mask, statistics, ones, options
            )
            out = (
                out + _sum_classes(grad.astype(dtype) * d_targets_in.astype(dtype), options)[..., 0]
            )
        return out

    d_logits_in = d_logits_in if use_logits else None
    d_targets_in = d_targets_in if use_targets else None
    return loss, tangent(logits, targets, statistics, d_logits_in, d_targets_in)


softmax_cross_entropy_rows_fwd_capable.defjvp(_rows_jvp, symbolic_zeros=True)

"""The fused cross-entropy's forward: an online log-sum-exp over tiles of logits.

For each token chunk the vocabulary chunks are visited in turn. With ``x = cap tanh(z /
cap)`` the (soft-capped) logits of a tile, each row keeps a running maximum ``m`` and a
running sum ``s = sum exp(x_c - m)`` over the classes seen so far; a chunk with maximum
``m_c`` updates them as::

    m' = max(m, m_c)        s' = s exp(m - m') + sum_c exp(x_c - m')

so after the last chunk ``lse = m + log s`` (:func:`tile_statistics`; ``m`` starts at the
lowest finite number, ``s`` at 0). In the same pass each row picks its label's logit ``x_y``
(in the chunk that owns it) and, with label smoothing, ``S = sum_c w_c x_c``. The per-row
loss is then the core's (:func:`jaxsoftmax.core.row_terms.row_loss`, in
:func:`loss_from_statistics`)::

    loss = (1 - eps) r (lse - x_y) + (eps / K) (W lse - S) + beta r lse^2

with ``r = w[y]`` (1 without class weights) and ``W = sum_c w_c``. The residuals are two
numbers per row, ``m`` and ``log s``. With ``return_aux`` the same pass also keeps
``a = sum_c e^(x_c - m) (x_c - m)`` (the entropy is ``H = log s - a / s``) and the first
class of largest logit (:func:`track_companions`).

On a vocabulary split over a mesh axis each shard runs this over its classes, and the
shards' per-row numbers are combined once at the end (:func:`across_vocabulary_shards`):
nothing else in the loss crosses devices.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.core import row_terms
from jaxsoftmax.core.chunks import operand_chunk
from jaxsoftmax.core.varying_axes import typed_like_inputs
from jaxsoftmax.tiles import plan as tile_plan
from jaxsoftmax.tiles import tpu_layout
from jaxsoftmax.tiles.plan import TilePlan


class RowStatistics(NamedTuple):
    """The running numbers of each row: ``m``, ``s``, ``x_y`` and ``S = sum_c w_c x_c``;
    with companions ``(a, best logit, its class)``, else None."""

    top: jax.Array
    total: jax.Array
    label_x: jax.Array
    weighted: jax.Array
    companions: tuple | None = None


class Sweep(NamedTuple):
    """What every tile of one call reads: the classifier and bias, the class weights
    (masked by the vocabulary mask), this shard's first class and all real classes."""

    classifier: jax.Array
    bias: jax.Array | None
    class_weights: jax.Array | None
    vocab_mask: jax.Array | None
    offset: object
    num_classes: int
    dtype: jnp.dtype
    plan: TilePlan


def initial_statistics(rows: int, dtype, companions: bool) -> RowStatistics:
    """A token chunk's numbers before its first tile: ``m`` the dtype's lowest finite
    number, ``s = x_y = S = 0`` (and ``a = 0``, no best logit yet).

    ``m`` starts finite, not at ``-inf``, so every running maximum is the shift itself: the
    first chunk's ``s exp(m - m')`` is ``0 * 0``, and a row none of whose classes counted yet
    keeps ``s = 0``. (With ``-inf`` each tile needs a second per-row vector, the maximum made
    finite, and XLA:TPU gives that pair its own slot in main memory: docs/performance.md.)"""
    tracked = None
    if companions:
        tracked = (jnp.zeros((rows,), dtype), jnp.full((rows,), -jnp.inf, dtype))
        tracked += (jnp.zeros((rows,), jnp.int32),)
    return RowStatistics(
        jnp.full((rows,), jnp.finfo(dtype).min, dtype), *[jnp.zeros((rows,), dtype)] * 3, tracked
    )


def zero_statistics(rows: int, dtype, companions: bool) -> RowStatistics:
    """The whole batch's buffers, each token chunk's numbers written in by position."""
    tracked = None
    if companions:
        tracked = (jnp.zeros((rows,), dtype),) * 2 + (jnp.zeros((rows,), jnp.int32),)
    return RowStatistics(*[jnp.zeros((rows,), dtype) for _ in range(4)], tracked)


def track_companions(tracked, top, total, shift, x_fresh, exponentials, chunk_top, first):
    """One chunk's update of the companions' running numbers (``return_aux``): ``a = sum_c
    e^(x_c - m) (x_c - m)`` rescaled to the new maximum like the sum of exponentials,
    ``a' = e^(m - m') (a + (m - m') s) + sum_new e^(x_c - m') (x_c - m')``, and the first
    class of largest logit (``first`` is the chunk's global first class)."""
    shifted_sum, best, best_class = tracked
    delta = jnp.where(total > 0, top - shift, 0.0)  # no class counted yet: nothing to rescale
    shifted = jnp.where(exponentials > 0, exponentials * (x_fresh - shift[:, None]), 0.0)
    shifted_sum = jnp.exp(delta) * (shifted_sum + delta * total) + jnp.sum(shifted, axis=-1)
    better = chunk_top > best  # strictly: an earlier class keeps a tie
    chunk_class = (first + jnp.argmax(x_fresh, axis=-1)).astype(jnp.int32)
    return (shifted_sum, jnp.maximum(best, chunk_top), jnp.where(better, chunk_class, best_class))


def combine_companions(tracked, top, total, axis_name):
    """The vocabulary shards' companions per row: ``a`` rescaled to the global maximum and
    summed, and the smallest class holding the global largest logit."""
    shifted_sum, best, best_class = tracked
    global_top = lax.pmax(top, axis_name)
    delta = jnp.where(total > 0, top - global_top, 0.0)  # a shard without classes adds 0
    shifted_sum = lax.psum(jnp.exp(delta) * (shifted_sum + delta * total), axis_name)
    holder = best == global_top
    best_class = jnp.where(holder, best_class, jnp.iinfo(jnp.int32).max)
    return (shifted_sum, global_top, lax.pmin(best_class, axis_name))


def smoothing_weights(sweep: Sweep, v0):
    """``w_c`` of the chunk starting at ``v0`` (ones without class weights)."""
    vc = sweep.plan.vocab_chunk
    if sweep.class_weights is None:
        return jnp.ones((vc,), sweep.dtype)
    weights = lax.dynamic_slice_in_dim(sweep.class_weights, sweep.offset + v0, vc)
    return weights.astype(sweep.dtype)


def tile_statistics(sweep: Sweep, hidden_t, labels_t, running: RowStatistics, i, v0):
    """``running`` updated by the tile of vocabulary chunk ``i`` (classes from ``v0``)."""
    plan, vc = sweep.plan, sweep.plan.vocab_chunk
    bias_c = None if sweep.bias is None else lax.dynamic_slice_in_dim(sweep.bias, v0, vc)
    classifier_c = tile_plan.classifier_chunk(sweep.classifier, v0, vc, plan.layout)
    z = tile_plan.tile_logits(hidden_t, classifier_c, bias_c, plan.layout, sweep.dtype)
    x = row_terms.capped(z, plan.options)
    fresh = tile_plan.visited(
        v0, i, vc, sweep.offset, sweep.num_classes, plan.options, sweep.vocab_mask
    )
    x_fresh = tile_plan.where_visited(fresh, x, -jnp.inf)
    top, total, label_x, weighted, tracked = running
    chunk_top = jnp.max(x_fresh, axis=-1)
    new_top = jnp.maximum(top, chunk_top)  # finite: m starts at the lowest finite number
    exponentials = jnp.exp(x_fresh - new_top[:, None])
    if plan.companions:
        first = sweep.offset + v0
        tracked = track_companions(
            tracked, top, total, new_top, x_fresh, exponentials, chunk_top, first
        )
    total = total * jnp.exp(top - new_top) + jnp.sum(exponentials, axis=-1)
    index = labels_t - (sweep.offset + v0)
    owned = (index >= 0) & (index < vc)
    picked = jnp.take_along_axis(x, jnp.clip(index, 0, vc - 1)[:, None], axis=-1)[:, 0]
    label_x = jnp.where(owned, picked, label_x)
    if plan.options.label_smoothing:
        w = smoothing_weights(sweep, v0)
        weighted = weighted + jnp.sum(tile_plan.where_visited(fresh, x * w[None, :], 0.0), axis=-1)
    return RowStatistics(new_top, total, label_x, weighted, tracked)


def token_chunk_statistics(sweep: Sweep, hidden_t, labels_t, initial: RowStatistics):
    """The rows of one token chunk swept over every vocabulary chunk; chunks holding only
    masked classes (a padded vocabulary's end) are skipped."""
    plan = sweep.plan
    num_vc, vocab_start = tile_plan.chunk_starts(local_classes(sweep), plan.vocab_chunk)

    def tile(running, i):
        return tile_statistics(sweep, hidden_t, labels_t, running, i, vocab_start(i)), None

    def vocab_step(running, i):
        if sweep.vocab_mask is None:
            return tile(running, i)
        live = jnp.any(
            tile_plan.visited(vocab_start(i), i, plan.vocab_chunk, sweep.offset,
                              sweep.num_classes, plan.options, sweep.vocab_mask)
        )  # fmt: skip
        return lax.cond(live, tile, lambda running, i: (running, None), running, i)

    statistics, _ = tile_plan.over_chunks(vocab_step, initial, num_vc)
    return statistics


def local_classes(sweep: Sweep) -> int:
    """The classes this shard's classifier holds (``V``, or ``V_local`` when split)."""
    return sweep.classifier.shape[0 if sweep.plan.layout == "vd" else 1]


def across_vocabulary_shards(statistics: RowStatistics, axis_name, smoothing: bool):
    """The vocabulary shards' statistics combined per row: a pmax, then one psum of the
    rescaled sums, the label logits (0 on every shard but the owner's) and the smoothing
    sums ``S`` (when label smoothing reads them)."""
    top, total, label_x, weighted, tracked = statistics
    if tracked is not None:
        tracked = combine_companions(tracked, top, total, axis_name)
    local_top, top = top, lax.pmax(top, axis_name)
    total = total * jnp.exp(local_top - top)  # both finite (initial_statistics)
    if smoothing:
        total, label_x, weighted = lax.psum((total, label_x, weighted), axis_name)
    else:
        total, label_x = lax.psum((total, label_x), axis_name)
    return RowStatistics(top, total, label_x, weighted, tracked)


def forward(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask,
            plan: TilePlan):  # fmt: skip
    """Per-row loss ``[N]`` and the residual statistics ``(m [N], log s [N])``; with
    ``plan.companions`` also ``(lse, entropy, correct)`` per row."""
    (classifier,), plan = tpu_layout.as_computed((classifier,), plan)
    num_tokens, tc = hidden.shape[0], plan.token_chunk
    _, num_classes, offset, rule = tile_plan.vocabulary(classifier, plan)
    dtype = row_terms.compute_dtype(jnp.result_type(hidden.dtype, classifier.dtype))
    class_weights, participating = tile_plan.with_vocab_mask(
        class_weights, vocab_mask, num_classes, dtype
    )
    varying = typed_like_inputs((hidden, classifier, bias, labels, class_weights, vocab_mask))
    sweep = Sweep(classifier, bias, class_weights, vocab_mask, offset, num_classes, dtype, plan)
    num_tc, token_start = tile_plan.chunk_starts(num_tokens, tc)

    def token_step(outputs, j):
        t0 = token_start(j)
        rows = token_chunk_statistics(
            sweep, operand_chunk(hidden, t0, tc), lax.dynamic_slice_in_dim(labels, t0, tc),
            varying(initial_statistics(tc, dtype, plan.companions)),
        )  # fmt: skip
        # Rows of a moved-back last token chunk are recomputed identically: overwriting is exact.
        update = lambda o, s: lax.dynamic_update_slice_in_dim(o, s, t0, 0)
        return jax.tree.map(update, outputs, rows), None

    initial = varying(zero_statistics(num_tokens, dtype, plan.companions))
    statistics, _ = tile_plan.over_chunks(token_step, initial, num_tc)
    if plan.options.axis_name is not None:
        smoothing = bool(plan.options.label_smoothing)
        statistics = across_vocabulary_shards(statistics, plan.options.axis_name, smoothing)
    return loss_from_statistics(
        statistics, labels, class_weights, row_mask, num_classes, participating, dtype, rule
    )


def loss_from_statistics(statistics: RowStatistics, labels, class_weights, row_mask,
                         num_classes, participating, dtype, rule):  # fmt: skip
    """The per-row loss by the core's formula (:func:`jaxsoftmax.core.row_terms.row_loss`),
    the residuals ``(m, log s)``, and with companions ``(lse, entropy, correct)``."""
    top, log_sum = statistics.top[:, None], jnp.log(statistics.total)[:, None]
    r = row_terms.row_weight(labels, class_weights, num_classes, dtype, rule)
    smoothing = None
    if rule.label_smoothing:  # sum_c w_c (lse - x_c), from the running sum_c w_c x_c
        weight_total = (
            num_classes if class_weights is None else jnp.sum(class_weights.astype(dtype))
        )
        smoothing = weight_total * (top + log_sum) - statistics.weighted[:, None]
    label_shifted = statistics.label_x[:, None] - top
    cross = row_terms.label_cross_entropy(log_sum, label_shifted, smoothing, r, participating,
                                          rule)  # fmt: skip
    live = None if row_mask is None else row_mask[:, None]
    bad = row_terms.bad_label_rows(labels, row_mask, num_classes, rule)
    loss = row_terms.row_loss((top, log_sum), cross, r, live, bad, rule)
    residuals = (top[:, 0], log_sum[:, 0])
    if statistics.companions is None:
        return loss, residuals
    shifted_sum, _, best_class = statistics.companions  # H = log s - a / s
    lse, entropy = top + log_sum, log_sum - (shifted_sum / statistics.total)[:, None]
    correct = (best_class == labels)[:, None]
    if live is not None:
        lse, entropy = jnp.where(live, lse, 0.0), jnp.where(live, entropy, 0.0)
        correct = correct & live
    return loss, residuals, (lse[:, 0], entropy[:, 0], correct[:, 0])

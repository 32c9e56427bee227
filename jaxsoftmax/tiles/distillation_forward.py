"""The fused distillation's forward: online statistics of both softmaxes, tile by tile.

With ``a = z_s / T`` and ``b = z_t / T`` (the rule of :mod:`jaxsoftmax.core.divergences`),
each token chunk visits the vocabulary chunks in turn, keeping per row the running maximum
and sum of exponentials of ``a`` and of ``b`` (:mod:`jaxsoftmax.tiles.online`), so that
``lse(a) = m_a + log s_a`` and ``lse(b) = m_b + log s_b`` at the end.

For forward KL the same pass accumulates the cross term relative to the running maxima (so
that a small KL between large logits is not lost to cancellation), rescaled like the sums
when a maximum grows (:func:`rescaled_cross`)::

    A = sum_c exp(b_c - m_b) ((b_c - m_b) - (a_c - m_a))
    A' = exp(m_b - m_b') (A + ((m_b - m_b') - (m_a - m_a')) s_b) + sum_new (the same, at m')
    KL(q || p) = A / s_b - log s_b + log s_a

(reverse KL: the same with the roles of ``a`` and ``b`` swapped). The JSD's mixture ``m``
needs both final ``lse`` before it exists, so it takes a second pass over the tiles that sums
``KL(q || m)`` and ``KL(p || m)`` (:func:`mixture_terms`). With ``hard_weight`` the pass also
tracks the student's statistics at temperature 1 (the same as ``a``'s when ``T = 1``) and
picks each label's logit, for the cross-entropy term ``lse(z_s) - z_s[y]``. On vocabulary
shards only the per-row numbers cross devices, combined as in
:func:`jaxsoftmax.tiles.online.across_shards`. Residuals: a few numbers per row.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from jaxsoftmax.core import divergences, row_terms
from jaxsoftmax.core.varying_axes import typed_like_inputs
from jaxsoftmax.tiles import online
from jaxsoftmax.tiles import plan as tile_plan
from jaxsoftmax.tiles.distillation_plan import (
    DistillationPlan,
    TileGrid,
    as_computed,
    fresh_classes,
    masked,
    tile_grid,
    tile_pair,
)


def rescaled_cross(cross, total, delta_own, delta_other):
    """The KL's cross term moved to new maxima: with ``A = sum_c e^(b_c - M_b) ((b_c - M_b)
    - (a_c - M_a))`` (forward KL; reverse KL swaps a and b) and ``delta = M - M'``,
    ``A' = e^(delta_b) (A + (delta_b - delta_a) s_b)``."""
    return jnp.exp(delta_own) * (cross + (delta_own - delta_other) * total)


def forward(student, teacher, labels, row_mask, vocab_mask, plan: DistillationPlan):
    """Per-row loss ``[N]`` and the per-row residuals: ``(m_a, log s_a, m_b, log s_b,
    KL terms..., [m and log s of z_s for the hard term when T != 1])``."""
    student, teacher, plan = as_computed(student, teacher, plan)
    hard, own = plan.hard_weight > 0, _own_hard_statistics(plan)
    grid = tile_grid(student, teacher, plan)
    num_tokens = student.hidden.shape[0]
    varying = typed_like_inputs((student, teacher, labels, vocab_mask))
    step = functools.partial(_token_step, grid, labels, vocab_mask, varying)
    count = 5 + hard + 2 * own
    init = varying(tuple(jnp.zeros((num_tokens,), grid.dtype) for _ in range(count)))
    rows, _ = tile_plan.over_chunks(step, init, grid.num_tc)
    if plan.options.axis_name is not None:  # per-row numbers only cross devices
        rows = _across_shards(rows, plan)
    top_a, total_a, top_b, total_b, cross, *hard_rows = rows
    log_a, log_b = jnp.log(total_a), jnp.log(total_b)
    if plan.divergence.divergence == "forward_kl":  # KL(q || p) = A / s_b - log s_b + log s_a
        terms = (cross / total_b - log_b + log_a,)
    elif plan.divergence.divergence == "reverse_kl":
        terms = (cross / total_a - log_a + log_b,)
    else:
        statistics = (top_a, log_a, top_b, log_b)
        terms = mixture_terms(student, teacher, vocab_mask, statistics, plan)
    t = plan.divergence.temperature
    loss = t * t * divergences.row_divergence(terms, plan.divergence)
    residuals = (top_a, log_a, top_b, log_b, *terms)
    if hard:
        loss, residuals = _with_hard_term(loss, residuals, hard_rows, labels, row_mask, grid)
    if row_mask is not None:
        loss = jnp.where(row_mask, loss, 0.0)
    return loss, residuals


def _own_hard_statistics(plan: DistillationPlan) -> bool:
    """Whether the hard term needs ``z_s``'s own statistics (``T != 1``; else ``a``'s)."""
    return plan.hard_weight > 0 and plan.divergence.temperature != 1.0


def _token_step(grid: TileGrid, labels, vocab_mask, varying, outputs, j):
    """One token chunk's sweep over the vocabulary, written into the per-row ``outputs``."""
    plan = grid.plan
    tc, dtype = plan.token_chunk, grid.dtype
    t0 = grid.token_start(j)
    labels_t = lax.dynamic_slice_in_dim(labels, t0, tc) if plan.hard_weight > 0 else None
    tile = functools.partial(_tile, grid, vocab_mask, t0, labels_t)
    init = [jnp.full((tc,), -jnp.inf, dtype), jnp.zeros((tc,), dtype)] * 2
    init += [jnp.zeros((tc,), dtype)] * (1 + (plan.hard_weight > 0))
    if _own_hard_statistics(plan):
        init += [jnp.full((tc,), -jnp.inf, dtype), jnp.zeros((tc,), dtype)]
    stats, _ = tile_plan.over_chunks(tile, varying(tuple(init)), grid.num_vc)
    # Rows of a moved-back last token chunk are recomputed identically: overwriting is exact.
    outputs = tuple(lax.dynamic_update_slice_in_dim(o, s, t0, 0) for o, s in zip(outputs, stats))
    return outputs, None


def _tile(grid: TileGrid, vocab_mask, t0, labels_t, carry, i):
    """One tile's update of the running ``(m_a, s_a, m_b, s_b, A, [z_s[y], m, s])``."""
    plan = grid.plan
    top_a, total_a, top_b, total_b, cross, *hard_carry = carry
    v0 = grid.vocab_start(i)
    z_s, z_t = tile_pair(grid, t0, v0)
    fresh = fresh_classes(grid, grid.vocab_start(i), i, vocab_mask)
    t = plan.divergence.temperature
    a, b = masked(z_s / t, fresh), masked(z_t / t, fresh)
    old_a, old_b = total_a, total_b
    top_a, total_a, delta_a, e_a, shift_a = online.update(top_a, total_a, a)
    top_b, total_b, delta_b, e_b, shift_b = online.update(top_b, total_b, b)
    if plan.divergence.divergence != "jsd":  # A, relative to the running maxima
        shifted = (b - shift_b[:, None]) - (a - shift_a[:, None])
        if plan.divergence.divergence == "forward_kl":
            cross = rescaled_cross(cross, old_b, delta_b, delta_a)
            terms = e_b * shifted
        else:
            cross = rescaled_cross(cross, old_a, delta_a, delta_b)
            terms = -e_a * shifted
        cross = cross + jnp.sum(tile_plan.where_visited(fresh, terms, 0.0), axis=-1)
    if plan.hard_weight > 0:
        hard_carry = _hard_tile(grid, labels_t, v0, z_s, fresh, hard_carry)
    return (top_a, total_a, top_b, total_b, cross, *hard_carry), None


def _hard_tile(grid: TileGrid, labels_t, v0, z_s, fresh, hard_carry):
    """The hard term's running numbers: the label's logit ``z_s[y]`` where this tile holds
    the label, and (when ``T != 1``) the online statistics of ``z_s`` itself."""
    vc = grid.plan.vocab_chunk
    label_x, *hard_stats = hard_carry
    if _own_hard_statistics(grid.plan):
        hard_stats = list(online.update(*hard_stats, masked(z_s, fresh))[:2])
    index = labels_t - (grid.offset + v0)
    owned = (index >= 0) & (index < vc)
    picked = jnp.take_along_axis(z_s, jnp.clip(index, 0, vc - 1)[:, None], axis=-1)
    return [jnp.where(owned, picked[:, 0], label_x), *hard_stats]


def _across_shards(rows, plan: DistillationPlan):
    """The vocabulary shards' per-row numbers combined: both softmaxes' ``(m, s)``, the cross
    term rescaled to the global maxima and summed, the label's logit from its shard."""
    axis_name, kind = plan.options.axis_name, plan.divergence.divergence
    top_a, total_a, top_b, total_b, cross, *hard_rows = rows
    local_a, local_b = total_a, total_b
    top_a, total_a, delta_a = online.across_shards(top_a, total_a, axis_name)
    top_b, total_b, delta_b = online.across_shards(top_b, total_b, axis_name)
    if kind == "forward_kl":
        cross = lax.psum(rescaled_cross(cross, local_b, delta_b, delta_a), axis_name)
    elif kind == "reverse_kl":
        cross = lax.psum(rescaled_cross(cross, local_a, delta_a, delta_b), axis_name)
    if plan.hard_weight > 0:
        hard_rows[0] = lax.psum(hard_rows[0], axis_name)  # 0 but on the label's shard
        if _own_hard_statistics(plan):
            hard_rows[1:] = online.across_shards(*hard_rows[1:], axis_name)[:2]
    return (top_a, total_a, top_b, total_b, cross, *hard_rows)


def _with_hard_term(loss, residuals, hard_rows, labels, row_mask, grid: TileGrid):
    """``loss + h (lse(z_s) - z_s[y])``, NaN on rows of a bad label; the residuals gain
    ``z_s``'s own statistics when ``T != 1``."""
    top_a, log_a = residuals[:2]
    label_x, *hard_stats = hard_rows
    own = _own_hard_statistics(grid.plan)
    top_h, log_h = (top_a, log_a) if not own else (hard_stats[0], jnp.log(hard_stats[1]))
    if own:
        residuals += (top_h, log_h)
    bad = row_terms.bad_label_rows(labels, row_mask, grid.num_classes, grid.rule)[:, 0]
    loss = loss + grid.plan.hard_weight * (log_h - (label_x - top_h))
    return jnp.where(bad, jnp.nan, loss), residuals


def mixture_terms(student, teacher, vocab_mask, statistics, plan: DistillationPlan):
    """The JSD's second pass: ``(KL(q || m), KL(p || m))`` per row, ``[N]`` each, from the
    first pass's ``statistics = (m_a, log s_a, m_b, log s_b)``."""
    grid = tile_grid(student, teacher, plan)
    num_tokens = student.hidden.shape[0]
    varying = typed_like_inputs((student, teacher, vocab_mask, statistics))
    step = functools.partial(_mixture_token_step, grid, vocab_mask, statistics, varying)
    init = varying((jnp.zeros((num_tokens,), grid.dtype),) * 2)
    sums, _ = tile_plan.over_chunks(step, init, grid.num_tc)
    if plan.options.axis_name is not None:
        sums = lax.psum(sums, plan.options.axis_name)
    return sums


def _mixture_token_step(grid: TileGrid, vocab_mask, statistics, varying, outputs, j):
    """One token chunk's sums of the JSD's per-class terms over the vocabulary."""
    tc = grid.plan.token_chunk
    t0 = grid.token_start(j)
    tile = functools.partial(_mixture_tile, grid, vocab_mask, statistics, t0)
    init = varying((jnp.zeros((tc,), grid.dtype),) * 2)
    sums, _ = tile_plan.over_chunks(tile, init, grid.num_vc)
    outputs = tuple(lax.dynamic_update_slice_in_dim(o, s, t0, 0) for o, s in zip(outputs, sums))
    return outputs, None


def _mixture_tile(grid: TileGrid, vocab_mask, statistics, t0, sums, i):
    """One tile's ``q (log q - log m)`` and ``p (log p - log m)``, summed over its classes,
    with ``log p = a - m_a - log s_a`` and ``log q = b - m_b - log s_b``."""
    top_a, log_a, top_b, log_b = statistics
    plan = grid.plan
    rows = lambda x: lax.dynamic_slice_in_dim(x, t0, plan.token_chunk)[:, None]
    t = plan.divergence.temperature
    v0 = grid.vocab_start(i)
    fresh = fresh_classes(grid, v0, i, vocab_mask)
    z_s, z_t = tile_pair(grid, t0, v0)
    log_p = masked(z_s / t, fresh) - rows(top_a) - rows(log_a)
    log_q = masked(z_t / t, fresh) - rows(top_b) - rows(log_b)
    summands = divergences.kl_summands(log_p, log_q, plan.divergence)
    return tuple(s + jnp.sum(x, axis=-1) for s, x in zip(sums, summands)), None

"""Forward mode of the fused token log-probabilities: their tangent, tile by tile.

:func:`forward_mode_rows` gives each row's ``log p_y`` and entropy ``H`` of ``x = h W^T + b``
(the fused cross-entropy's tiles, :mod:`jaxsoftmax.tiles.cross_entropy`) as a
``jax.custom_jvp``, so ``jax.jvp`` and ``jax.jacfwd`` run through them (the fused loss itself
is a ``jax.custom_vjp``, which JAX refuses to push tangents through). With ``p = softmax(x)``
the derived rule (docs/derivation.md, section 10) applied to a tangent ``dx`` of the logits::

    d log p_y = dx_y - sum_c p_c dx_c
    dH        = -sum_c p_c (log p_c + H) dx_c = -(S2 + H S1)

with ``S1 = sum_c p_c dx_c`` and ``S2 = sum_c p_c log p_c dx_c``. The logits' tangent is
never built either: for each ``[T, Vc]`` tile, ``dx = dh W_c^T + h dW_c^T + db_c`` (two
matrix products, one where only ``h`` or only ``W`` moves), ``p = exp(x - lse)`` from the
tile's logits (a third product) and the rows' ``lse`` of the primal, and the three sums
above accumulate per row in float32. On a vocabulary split over a mesh axis each shard sums
its classes and one ``psum`` adds the shards' ``(dx_y, S1, S2)``.

Reverse mode through it is JAX's transpose of these tiles (each tile rematerialized, so no
``[N, V]`` residual is kept): the same gradient as the hand-written backward of
:func:`jaxsoftmax.tiles.cross_entropy.linear_rows`, which the default (reverse-mode) path
uses and which is faster.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.core import row_terms
from jaxsoftmax.core.chunks import operand_chunk
from jaxsoftmax.core.varying_axes import typed_like_inputs
from jaxsoftmax.tiles import cross_entropy as fused
from jaxsoftmax.tiles import plan as tile_plan
from jaxsoftmax.tiles.plan import TilePlan


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def forward_mode_rows(hidden, classifier, bias, labels, row_mask, plan: TilePlan):
    """``(log p_y, H)`` per row ``[N]`` in float32 (0 where ``row_mask`` is False), with a
    tangent rule for ``hidden``, ``classifier`` and ``bias``."""
    log_p, _, entropy = _primal(hidden, classifier, bias, labels, row_mask, plan)
    return log_p, entropy


def _primal(hidden, classifier, bias, labels, row_mask, plan):
    """``(log p_y, lse, H)`` per row by the fused loss's forward, with its companions."""
    plan = dataclasses.replace(plan, companions=True)
    head = LinearHead(hidden, classifier, bias)
    loss, _, aux = fused.rows_and_weights(head, labels, None, row_mask, None, plan)
    return -loss, aux.lse, aux.entropy


def _forward_mode_rows_jvp(plan, primals, tangents):
    hidden, classifier, bias, labels, row_mask = primals
    d_hidden, d_classifier, d_bias = (t if _moves(t) else None for t in tangents[:3])
    log_p, lse, entropy = _primal(hidden, classifier, bias, labels, row_mask, plan)
    d_log_p, d_entropy = row_tangents(
        hidden, classifier, bias, labels, row_mask, lse, entropy,
        (d_hidden, d_classifier, d_bias), plan,
    )  # fmt: skip
    return (log_p, entropy), (d_log_p, d_entropy)


forward_mode_rows.defjvp(_forward_mode_rows_jvp, symbolic_zeros=True)


def row_tangents(hidden, classifier, bias, labels, row_mask, lse, entropy, tangents,
                 plan: TilePlan):  # fmt: skip
    """``(d log p_y, dH)`` per row for the tangents ``(dh, dW, db)`` of the inputs (zeros
    where a row is masked, NaN where its label is outside the vocabulary)."""
    d_hidden, d_classifier, d_bias = tangents
    num_tokens, tc = hidden.shape[0], plan.token_chunk
    num_local, num_classes, offset, _ = tile_plan.vocabulary(classifier, plan)
    dtype = row_terms.compute_dtype(jnp.result_type(hidden.dtype, classifier.dtype))
    live = jnp.ones((num_tokens,), bool) if row_mask is None else row_mask
    # A masked row's p is 0 everywhere (lse = inf): no NaN reaches a transposed gradient.
    lse = jnp.where(live, lse.astype(dtype), jnp.inf)
    inputs = (hidden, classifier, bias, labels, lse, d_hidden, d_classifier, d_bias)
    varying = typed_like_inputs(inputs)
    num_tc, token_start = tile_plan.chunk_starts(num_tokens, tc)
    num_vc, vocab_start = tile_plan.chunk_starts(num_local, plan.vocab_chunk)
    vc = plan.vocab_chunk

    @jax.checkpoint  # each tile recomputed in a transpose: no [T, Vc] residual per tile
    def tile(sums, t0, i):
        v0 = vocab_start(i)
        h_t, lse_t = operand_chunk(hidden, t0, tc), lax.dynamic_slice_in_dim(lse, t0, tc)
        w_c = tile_plan.classifier_chunk(classifier, v0, vc, plan.layout)
        b_c = None if bias is None else lax.dynamic_slice_in_dim(bias, v0, vc)
        x = tile_plan.tile_logits(h_t, w_c, b_c, plan.layout, dtype)
        fresh = tile_plan.visited(v0, i, vc, offset, num_classes, plan.options)
        p = tile_plan.where_visited(fresh, jnp.exp(x - lse_t[:, None]), 0.0)
        p_log_p = jnp.where(p > 0, p * (x - lse_t[:, None]), 0.0)
        dx = _tile_tangent(t0, v0, h_t, w_c, (d_hidden, d_classifier, d_bias), plan, dtype)
        index = lax.dynamic_slice_in_dim(labels, t0, tc) - (offset + v0)
        hit = tile_plan.where_visited(
            fresh, lax.broadcasted_iota(jnp.int32, x.shape, 1) == index[:, None], False
        )
        d_label, s1, s2 = sums
        return (
            d_label + jnp.sum(jnp.where(hit, dx, 0.0), axis=-1),
            s1 + jnp.sum(p * dx, axis=-1),
            s2 + jnp.sum(p_log_p * dx, axis=-1),
        )

    def token_step(outputs, j):
        t0 = token_start(j)
        zeros = varying(tuple(jnp.zeros((tc,), dtype) for _ in range(3)))
        sums, _ = tile_plan.over_chunks(lambda sums, i: (tile(sums, t0, i), None), zeros, num_vc)
        # Rows of a moved-back last token chunk are recomputed identically: overwriting is exact.
        update = lambda o, s: lax.dynamic_update_slice_in_dim(o, s, t0, 0)
        return jax.tree.map(update, outputs, sums), None

    initial = varying(tuple(jnp.zeros((num_tokens,), dtype) for _ in range(3)))
    sums = tile_plan.over_chunks(token_step, initial, num_tc)[0]
    if plan.options.axis_name is not None:
        sums = lax.psum(sums, plan.options.axis_name)
    d_label, s1, s2 = sums
    d_log_p = d_label - s1
    d_entropy = -(s2 + entropy.astype(dtype) * s1)
    d_log_p = jnp.where((labels < 0) | (labels >= num_classes), jnp.nan, d_log_p)
    return jnp.where(live, d_log_p, 0.0), jnp.where(live, d_entropy, 0.0)


def _tile_tangent(t0, v0, hidden_t, classifier_c, tangents, plan: TilePlan, dtype):
    """``dx = dh_t W_c^T + h_t dW_c^T + db_c`` for one tile, ``[T, Vc]`` in ``dtype``; a
    tangent that is None (a symbolic zero) adds nothing and costs no product."""
    d_hidden, d_classifier, d_bias = tangents
    tc, vc = plan.token_chunk, plan.vocab_chunk
    dx = jnp.zeros((hidden_t.shape[0], vc), dtype)
    if d_hidden is not None:
        dh_t = operand_chunk(d_hidden, t0, tc)
        dx = dx + tile_plan.tile_logits(dh_t, classifier_c, None, plan.layout, dtype)
    if d_classifier is not None:
        dw_c = tile_plan.classifier_chunk(d_classifier, v0, vc, plan.layout)
        dx = dx + tile_plan.tile_logits(hidden_t, dw_c, None, plan.layout, dtype)
    if d_bias is not None:
        dx = dx + lax.dynamic_slice_in_dim(d_bias, v0, vc).astype(dtype)[None, :]
    return dx


def _moves(tangent) -> bool:
    return tangent is not None and not isinstance(tangent, jax.custom_derivatives.SymbolicZero)

"""The fused distillation's backward: the derived gradients, tile by tile.

For each vocabulary chunk and token chunk both tiles of logits are recomputed and
:func:`jaxsoftmax.core.divergences.logits_gradients` (plus the cross-entropy rule's tile,
:func:`jaxsoftmax.core.row_terms.logits_gradient`, for the hard term) turns them into the
gradient tiles ``G_s`` and ``G_t`` for the rows' cotangent ``g``, consumed at once
(:func:`products`)::

    dh_s[T] += G_s W_s[Vc]    dW_s[Vc] += G_s^T h_s[T]    db_s[Vc] += sum_T G_s
    (and the teacher's, with G_t)

The log-probabilities come from the forward's residuals, ``log p = a - m_a - log s_a`` and
``log q = b - m_b - log s_b``: nothing is normalized again. A model whose gradient is not
wanted (:class:`jaxsoftmax.tiles.distillation_plan.Wanted`) gets no gradient tile and no
products, so a frozen teacher costs two matrix products per tile (its logits, forward and
backward), not four. The classifier's gradient is assembled one vocabulary chunk at a time;
a moved-back last chunk adds exactly 0 to the classes an earlier chunk wrote, and the rows of
a moved-back last token chunk get ``g = 0``. With a ``vocab_mask`` a chunk of only masked
classes is skipped.

A model with bf16 or float16 hidden states gets ``dh`` from a second, token-outer pass
(:func:`_hidden_gradients_by_token_chunks`), as the fused cross-entropy's backward does
(:mod:`jaxsoftmax.tiles.cross_entropy_backward`): ``G W[Vc]`` summed over the vocabulary
chunks in a ``[T, d]`` float32 block per token chunk, never an ``[N, d]`` float32 sum, for one
more pass over the tiles.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.core import divergences, row_terms
from jaxsoftmax.core.chunks import operand_chunk, slice_chunk
from jaxsoftmax.core.varying_axes import typed_like_inputs
from jaxsoftmax.tiles import plan as tile_plan
from jaxsoftmax.tiles import tpu_layout
from jaxsoftmax.tiles.cross_entropy_backward import joined_token_blocks, summed_over_token_shards
from jaxsoftmax.tiles.distillation_plan import (
    DistillationPlan,
    TileGrid,
    Wanted,
    as_computed,
    fresh_classes,
    masked,
    tile_grid,
    tile_pair,
)


class _Rows(NamedTuple):
    """What the backward reads per row: the cotangent and the forward's residuals."""

    labels: Any  # [N] or None
    row_mask: Any  # [N] or None
    g: Any  # [N]
    statistics: tuple  # (m_a, log s_a, m_b, log s_b)
    terms: list  # the KL terms, one or two [N]
    hard_stats: list  # m and log s of the hard term's softmax


def backward(student, teacher, labels, row_mask, vocab_mask, residuals, g, wanted: Wanted,
             plan: DistillationPlan):  # fmt: skip
    """Gradients ``(LinearHead, LinearHead)`` of the student and the teacher (None where not wanted)."""
    given = plan
    student, teacher, plan = as_computed(student, teacher, plan)
    grid = tile_grid(student, teacher, plan)
    top_a, log_a, top_b, log_b, *rest = residuals
    num_terms = 2 if plan.divergence.divergence == "jsd" else 1
    terms, hard_stats = rest[:num_terms], rest[num_terms:] or [top_a, log_a]
    rows = _Rows(labels, row_mask, g, (top_a, log_a, top_b, log_b), terms, hard_stats)
    participating = None
    if vocab_mask is not None:
        participating = jnp.sum(vocab_mask[: grid.num_classes].astype(grid.dtype))
    models = [m for m, w in ((student, wanted.student), (teacher, wanted.teacher)) if w]
    varying = typed_like_inputs((student, teacher, labels, row_mask, vocab_mask, residuals, g))
    step = functools.partial(_vocab_step, grid, rows, vocab_mask, participating, wanted,
                             models, varying)  # fmt: skip
    # A narrow model's dh comes from the token-outer pass (None in the vocabulary-outer one).
    narrow = [_narrow(m) for m in models]
    # dW and db are summed over the token shards chunk by chunk (_add_chunk): typed like W, b.
    init = [
        (
            None if thin else varying(jnp.zeros(m.hidden.shape, _hidden_sum_dtype(m))),
            typed_like_inputs(m.classifier)(jnp.zeros_like(m.classifier)),
            None if m.bias is None else typed_like_inputs(m.bias)(jnp.zeros_like(m.bias)),
        )
        for m, thin in zip(models, narrow)
    ]
    found, _ = tile_plan.over_chunks(step, init, grid.num_vc)
    if any(narrow):
        by_token_chunks = _hidden_gradients_by_token_chunks(
            grid, rows, vocab_mask, participating, wanted, models, varying, narrow
        )
        found = [
            (d_hidden, *rest) if d_hidden is not None else (by_token_chunks[k], *rest)
            for k, (d_hidden, *rest) in enumerate(found)
        ]
    found = iter(found)
    gradients = []
    for model, w in ((student, wanted.student), (teacher, wanted.teacher)):
        if not w:
            gradients.append(None)
            continue
        d_hidden, d_classifier, d_bias = next(found)
        d_classifier = tpu_layout.as_given(d_classifier, given)
        gradients.append(LinearHead(d_hidden.astype(model.hidden.dtype), d_classifier, d_bias))
    return tuple(gradients)


def _narrow(model: LinearHead) -> bool:
    """bf16 or float16 hidden states, whose ``dh`` a float32 ``[N, d]`` sum would outweigh."""
    return jnp.dtype(model.hidden.dtype).itemsize < _hidden_sum_dtype(model).itemsize


def _hidden_sum_dtype(model: LinearHead):
    return row_terms.compute_dtype(model.hidden.dtype)


def _hidden_gradients_by_token_chunks(grid: TileGrid, rows: _Rows, vocab_mask, participating,
                                      wanted, models, varying, narrow):  # fmt: skip
    """``dh`` of each model marked in ``narrow`` (None for the others), token chunk by token
    chunk: ``sum_Vc G W[Vc]`` in a float32 ``[T, d]`` block, written in the hidden states'
    dtype."""
    plan = grid.plan
    tc, vc = plan.token_chunk, plan.vocab_chunk

    def token_chunk(_, j):
        t0 = grid.token_start(j)
        sliced, g_t = _row_cotangents(rows, t0, j, tc)

        def vocabulary(totals, i):
            v0 = grid.vocab_start(i)
            fresh = fresh_classes(grid, v0, i, vocab_mask)
            block = row_terms.ClassBlock(grid.offset + v0, grid.num_classes, None, participating)
            z_s, z_t = tile_pair(grid, t0, v0)
            grads = _gradient_tiles(grid, rows, sliced, z_s, z_t, fresh, g_t, block, wanted)
            grads = [tile_plan.where_visited(fresh, x, 0.0) for x in grads if x is not None]
            added = []
            for total, grad, model in zip(totals, grads, models):
                if total is not None:
                    classifier_c = tile_plan.classifier_chunk(model.classifier, v0, vc,
                                                              plan.layout)  # fmt: skip
                    total = total + tile_plan.hidden_gradient(
                        grad.astype(model.hidden.dtype), classifier_c, plan.layout, total.dtype
                    )
                added.append(total)
            return added, None

        zeros = [
            varying(jnp.zeros((tc, m.hidden.shape[1]), _hidden_sum_dtype(m))) if thin else None
            for m, thin in zip(models, narrow)
        ]
        totals = tile_plan.over_chunks(vocabulary, zeros, grid.num_vc)[0]
        return None, [
            None if t is None else t.astype(m.hidden.dtype) for t, m in zip(totals, models)
        ]

    blocks = tile_plan.over_chunks(token_chunk, None, grid.num_tc)[1]
    num_tokens = models[0].hidden.shape[0]
    return [None if b is None else joined_token_blocks(b, num_tokens) for b in blocks]


def _row_cotangents(rows: _Rows, t0, j, tc):
    """The slicer of token chunk ``j`` (at ``t0``) and its rows' cotangent ``g``: 0 on rows
    a moved-back last chunk shares with an earlier one, and on masked rows."""
    sliced = lambda x: None if x is None else lax.dynamic_slice_in_dim(x, t0, tc)
    fresh_rows = tile_plan.visited_rows(t0, j, tc, rows.g.shape[0])
    g_t = sliced(rows.g) if fresh_rows is None else jnp.where(fresh_rows, sliced(rows.g), 0.0)
    if rows.row_mask is not None:
        g_t = jnp.where(sliced(rows.row_mask), g_t, 0.0)
    return sliced, g_t


def _vocab_step(grid: TileGrid, rows: _Rows, vocab_mask, participating, wanted, models,
                varying, carry, i):  # fmt: skip
    """One vocabulary chunk: its gradient tiles over all token chunks, then the chunk's
    ``dW[Vc]`` and ``db[Vc]`` added to the models' gradients (``dh`` is carried through)."""
    plan = grid.plan
    v0 = grid.vocab_start(i)
    fresh = fresh_classes(grid, v0, i, vocab_mask)
    block = row_terms.ClassBlock(grid.offset + v0, grid.num_classes, None, participating)
    inner = []
    for model, (d_hidden, _, _) in zip(models, carry):
        width = model.hidden.shape[1]
        shape = (plan.vocab_chunk, width) if plan.layout == "vd" else (width, plan.vocab_chunk)
        acc = row_terms.compute_dtype(model.classifier.dtype)
        bias = None if model.bias is None else jnp.zeros((plan.vocab_chunk,), acc)
        inner.append((d_hidden, *varying((jnp.zeros(shape, acc), bias))))
    step = functools.partial(_token_step, grid, rows, v0, fresh, block, wanted, models)
    run = lambda inner: tile_plan.over_chunks(step, inner, grid.num_tc)[0]
    if vocab_mask is None:
        inner = run(inner)
    else:  # a chunk of only masked classes adds nothing: skipped
        inner = lax.cond(jnp.any(fresh), run, lambda x: x, inner)
    return [_add_chunk(plan, v0, *found) for found in zip(models, carry, inner)], None


def _add_chunk(plan: DistillationPlan, v0, model, whole, chunk):
    """``dW[Vc] += dW_c``, ``db[Vc] += db_c`` for one model; ``dh`` is the chunk's. Classes
    already written by an earlier chunk got exactly 0 here: adding is exact."""
    vc = plan.vocab_chunk
    _, d_classifier, d_bias = whole
    d_hidden, d_classifier_c, d_bias_c = chunk
    axis = 0 if plan.layout == "vd" else 1
    d_classifier_c = summed_over_token_shards(d_classifier_c, model.classifier)
    d_classifier = lax.dynamic_update_slice_in_dim(
        d_classifier, slice_chunk(d_classifier, v0, vc, axis) + d_classifier_c, v0, axis
    )
    if d_bias is not None:
        d_bias_c = summed_over_token_shards(d_bias_c, model.bias)
        d_bias = lax.dynamic_update_slice_in_dim(
            d_bias, lax.dynamic_slice_in_dim(d_bias, v0, vc) + d_bias_c, v0, 0
        )
    return d_hidden, d_classifier, d_bias


def _token_step(grid: TileGrid, rows: _Rows, v0, fresh, block, wanted, models, inner, j):
    """One tile: its gradient tiles ``G_s``, ``G_t`` (those wanted), consumed by the products."""
    tc = grid.plan.token_chunk
    t0 = grid.token_start(j)
    sliced, g_t = _row_cotangents(rows, t0, j, tc)
    z_s, z_t = tile_pair(grid, t0, v0)
    grads = _gradient_tiles(grid, rows, sliced, z_s, z_t, fresh, g_t, block, wanted)
    grads = [tile_plan.where_visited(fresh, x, 0.0) for x in grads if x is not None]
    hidden_tiles = [operand_chunk(m.hidden, t0, tc) for m in models]
    return [
        products(acc, grad, h_t, m, v0, t0, grid.plan)
        for acc, grad, h_t, m in zip(inner, grads, hidden_tiles, models)
    ], None


def _gradient_tiles(grid: TileGrid, rows: _Rows, sliced, z_s, z_t, fresh, g_t, block, wanted):
    """``[G_s, G_t]`` of one tile (None where not wanted): the divergence's derived gradients
    times ``g``, plus ``h (softmax(z_s) - onehot(y)) g`` for the hard term (the core's rule)."""
    plan = grid.plan
    div, t = plan.divergence, plan.divergence.temperature
    top_a, log_a, top_b, log_b = rows.statistics
    log_p = masked(z_s / t, fresh) - sliced(top_a)[:, None] - sliced(log_a)[:, None]
    log_q = masked(z_t / t, fresh) - sliced(top_b)[:, None] - sliced(log_b)[:, None]
    terms_t = [sliced(term)[:, None] for term in rows.terms]
    grads = divergences.logits_gradients(log_p, log_q, terms_t, div, wanted.student, wanted.teacher)
    grads = [None if x is None else x * g_t[:, None] for x in grads]
    if plan.hard_weight > 0 and wanted.student:
        statistics = tuple(sliced(x)[:, None] for x in rows.hard_stats)
        hard_g = plan.hard_weight * g_t
        grads[0] = grads[0] + row_terms.logits_gradient(
            z_s, sliced(rows.labels), None, None, sliced(rows.row_mask), statistics, hard_g,
            grid.rule, block,
        )  # fmt: skip
    return grads


def products(inner, grad, hidden_t, model, v0, t0, plan: DistillationPlan):
    """One model's ``dh[T] += G W[Vc]`` (unless ``dh`` is None: the token-outer pass's),
    ``dW[Vc] += G^T h[T]``, ``db[Vc] += sum G``."""
    d_hidden, d_classifier_c, d_bias_c = inner
    grad_in = grad.astype(model.hidden.dtype)  # the products in the inputs' dtype
    if d_hidden is not None:
        classifier_c = tile_plan.classifier_chunk(
            model.classifier, v0, plan.vocab_chunk, plan.layout
        )
        d_hidden_t = tile_plan.hidden_gradient(grad_in, classifier_c, plan.layout, d_hidden.dtype)
        tc = plan.token_chunk
        d_hidden = lax.dynamic_update_slice_in_dim(
            d_hidden, lax.dynamic_slice_in_dim(d_hidden, t0, tc) + d_hidden_t, t0, 0
        )
    acc = d_classifier_c.dtype
    if plan.layout == "vd":  # G^T h: [Vc, d]
        product = lax.dot_general(grad_in, hidden_t, (((0,), (0,)), ((), ())),
                                  preferred_element_type=acc)  # fmt: skip
    else:  # h^T G: [d, Vc]
        product = lax.dot_general(hidden_t, grad_in, (((0,), (0,)), ((), ())),
                                  preferred_element_type=acc)  # fmt: skip
    d_classifier_c = d_classifier_c + product
    if d_bias_c is not None:
        d_bias_c = d_bias_c + jnp.sum(grad.astype(acc), axis=0)
    return d_hidden, d_classifier_c, d_bias_c

"""The fused cross-entropy's backward: the core's rule, tile by tile.

For each vocabulary chunk and each token chunk the tile of logits is recomputed and the
core's derived ``dL/dz = ((sum q + 2 beta r lse) s - q) g (1 - tanh^2)``
(:func:`jaxsoftmax.core.row_terms.logits_gradient`, given the chunk's offset through a
:class:`~jaxsoftmax.core.row_terms.ClassBlock`) turns it into the tile ``G`` of the logits'
gradient (:func:`tile_gradient`), which is consumed at once (:func:`products`)::

    dh[T] += G W[Vc]        dW[Vc] += G^T h[T]        db[Vc] += sum_T G

``dW[Vc]`` and ``db[Vc]`` are accumulated over the token chunks in the plan's
``accumulation_dtype`` (float32 by default) and written once per vocabulary chunk; ``dh`` is
accumulated in float32 over the vocabulary chunks. Classes an earlier (moved-back) chunk
already visited get a zero gradient here, so adding each chunk's block is exact.

For float32 hidden states ``dh`` is accumulated in the output itself. For bf16 or float16
ones that float32 sum would be an ``[N, d]`` float32 temporary, the largest of the backward
(256 MiB at Llama 3's shape, 16384 x 4096), so the backward makes two passes instead
(:func:`hidden_gradient_by_token_chunks`): the vocabulary-outer pass above for ``dW`` and
``db`` only, and a token-outer pass that sums ``G W[Vc]`` over the vocabulary chunks into a
``[T, d]`` float32 block per token chunk, written once in the hidden states' dtype. It
recomputes each tile's logits once more (five matrix products for loss and gradients where
the one-pass backward has four) and holds no ``[N, d]`` sum.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.core import companion_terms, cpu_programs, row_terms
from jaxsoftmax.core.chunks import operand_chunk, slice_chunk
from jaxsoftmax.core.varying_axes import summed_like, typed_like_inputs
from jaxsoftmax.tiles import plan as tile_plan
from jaxsoftmax.tiles import tpu_layout
from jaxsoftmax.tiles.plan import TilePlan


class Rows(NamedTuple):
    """What the backward reads per row: labels, the row mask, ``(lse[, H])`` from the
    forward's statistics and the cotangents ``(g[, g_lse, g_H])``."""

    labels: jax.Array
    row_mask: jax.Array | None
    statistics: tuple
    cotangents: tuple


class Chunk(NamedTuple):
    """One vocabulary chunk: its classifier block and bias, class weights, the rule's
    :class:`~jaxsoftmax.core.row_terms.ClassBlock` and the classes that count (``fresh``)."""

    classifier: jax.Array
    bias: jax.Array | None
    class_weights: jax.Array | None
    block: row_terms.ClassBlock
    fresh: jax.Array


def tile_gradient(plan: TilePlan, rule, chunk: Chunk, rows: Rows, hidden_t, t0, j, dtype):
    """``G``, the ``[T, Vc]`` tile of ``dL/dz`` for the token chunk ``j`` at ``t0``, and each
    row's total cotangent magnitude (for the gradient filter)."""
    tc = plan.token_chunk
    sliced = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, t0, tc)
    # Rows of a moved-back last chunk that an earlier chunk already took get g = 0.
    fresh_rows = tile_plan.visited_rows(t0, j, tc, rows.labels.shape[0])
    g_t, *g_companions = (
        sliced(c) if fresh_rows is None else jnp.where(fresh_rows, sliced(c), 0.0)
        for c in rows.cotangents
    )
    z = tile_plan.tile_logits(hidden_t, chunk.classifier, chunk.bias, plan.layout, dtype)
    gradient_here = cpu_programs.per_platform(
        row_terms.logits_gradient, cpu_programs.logits_gradient, options=rule, block=chunk.block
    )
    lse, *entropy = rows.statistics  # the entropy too with companions
    statistics_t = (sliced(lse)[:, None], 0.0)  # (m, log s) as (lse, 0): one number per row
    row_mask_t = sliced(rows.row_mask)
    grad = gradient_here(
        z, sliced(rows.labels), None, chunk.class_weights, row_mask_t, statistics_t, g_t
    )
    if plan.companions:  # + s (g_lse - g_H (log s + H)), jaxsoftmax.core.companion_terms
        live_t = None if row_mask_t is None else row_mask_t[:, None]
        grad = grad.astype(dtype) + companion_terms.companions_gradient(
            row_terms.capped(z, rule), statistics_t, sliced(entropy[0]), *g_companions,
            None, live_t, rule,
        )  # fmt: skip
    grad = tile_plan.where_visited(chunk.fresh, grad, 0.0)
    return grad, sum(jnp.abs(c) for c in (g_t, *g_companions))[:, None]


def products(plan: TilePlan, chunk: Chunk, inner, t0, hidden_t, grad, dtypes):
    """``dh[T] += G W[Vc]``, ``dW[Vc] += G^T h[T]``, ``db[Vc] += sum G``.

    The matrix products run in the inputs' dtype, as the naive composition's do;
    ``dtypes`` are ``(hidden's dtype, dh's accumulation dtype, dW's)``.
    """
    d_hidden, d_classifier_c, d_bias_c = inner
    hidden_dtype, hidden_acc, acc = dtypes
    grad_in = grad.astype(hidden_dtype)
    if d_hidden is not None:  # None: dh comes from the token-outer pass
        d_hidden_t = tile_plan.hidden_gradient(grad_in, chunk.classifier, plan.layout, hidden_acc)
        tc = plan.token_chunk
        d_hidden = lax.dynamic_update_slice_in_dim(
            d_hidden, lax.dynamic_slice_in_dim(d_hidden, t0, tc) + d_hidden_t, t0, 0
        )
    # G^T h ([Vc, d]) or h^T G ([d, Vc])
    d_classifier_c = d_classifier_c + tile_plan.classifier_gradient(
        grad_in, hidden_t, plan.layout, acc
    )
    if d_bias_c is not None:
        d_bias_c = d_bias_c + jnp.sum(grad.astype(acc), axis=0)
    return d_hidden, d_classifier_c, d_bias_c


def token_step(plan, rule, chunk, rows, hidden, dtypes, compute_dtype, inner, j):
    """One token chunk's tile: its gradient, then its products (skipped under the opt-in
    gradient filter when every entry is below ``eps`` times its row's cotangent: softmax
    below ``eps``, no label)."""
    _, token_start = tile_plan.chunk_starts(hidden.shape[0], plan.token_chunk)
    t0 = token_start(j)
    hidden_t = operand_chunk(hidden, t0, plan.token_chunk)
    grad, scale = tile_gradient(plan, rule, chunk, rows, hidden_t, t0, j, compute_dtype)
    keep = lambda inner: products(plan, chunk, inner, t0, hidden_t, grad, dtypes)
    if plan.gradient_filter is None:
        return keep(inner), None
    negligible = jnp.all(jnp.abs(grad) <= plan.gradient_filter * scale)
    return lax.cond(negligible, lambda inner: inner, keep, inner), None


def vocabulary_chunk(classifier, bias, class_weights, shard, vocab_mask, plan, i, v0) -> Chunk:
    """Chunk ``i``'s (from class ``v0``) classifier block, bias, class weights, block and
    counted classes;
    ``shard`` is :func:`jaxsoftmax.tiles.plan.vocabulary`'s ``(local, V, offset)`` and
    ``class_weights`` the masked weights and ``K`` of
    :func:`~jaxsoftmax.tiles.plan.with_vocab_mask`."""
    _, num_classes, offset = shard
    vc = plan.vocab_chunk
    weights, participating = class_weights
    classifier_c = tile_plan.classifier_chunk(classifier, v0, vc, plan.layout)
    bias_c = None if bias is None else lax.dynamic_slice_in_dim(bias, v0, vc)
    weights_c = None if weights is None else lax.dynamic_slice_in_dim(weights, offset + v0, vc)
    return Chunk(
        classifier=classifier_c,
        bias=bias_c,
        class_weights=weights_c,
        block=row_terms.ClassBlock(offset + v0, num_classes, weights, participating),
        fresh=tile_plan.visited(v0, i, vc, offset, num_classes, plan.options, vocab_mask),
    )


def add_chunk(total, chunk_gradient, v0, width, axis):
    """``total`` with ``chunk_gradient`` added at classes ``[v0, v0 + width)``."""
    block = (
        slice_chunk(total, v0, width, axis)  # a sum: never rounded
        if total.ndim == 2
        else lax.dynamic_slice_in_dim(total, v0, width)
    )
    return lax.dynamic_update_slice_in_dim(total, block + chunk_gradient, v0, axis)


def summed_over_token_shards(chunk_gradient, primal):
    """A chunk's gradient in ``primal``'s dtype, summed over the token shards as soon as it
    is made (``shard_map``'s batch axes; nothing outside ``shard_map``), so the unsummed
    ``[V, d]`` gradient is never held.

    The optimization barrier keeps the sum in the loop: XLA moves an all-reduce whose result
    a loop accumulates out of the loop (one collective instead of one per chunk), and then
    holds the loop's unsummed ``[V / S, d]`` result beside the all-reduce's: XLA:TPU under
    libtpu 0.0.50.1 (JAX 0.12) does not reduce it in place, 379 MiB per chip for
    ``sharded_linear_cross_entropy`` at Llama 3's shape on the v5e 2x4 mesh in bf16 against
    128.6 with the barrier (``tests/tpu/check_compiled_memory.py``). The same bytes cross the
    devices, in ``V / (S Vc)`` collectives of one chunk each.
    """
    if chunk_gradient is None:
        return None
    gradient = chunk_gradient.astype(primal.dtype)
    summed = summed_like(gradient, primal)
    return gradient if summed is gradient else lax.optimization_barrier(summed)


class Sweep(NamedTuple):
    """What every vocabulary chunk of one backward reads: the inputs, the masked class
    weights and ``K`` (:func:`~jaxsoftmax.tiles.plan.with_vocab_mask`), the shard
    ``(V_local, V, offset)``, the rule's options, the dtypes ``(compute, dh, dW)``, the
    zero carries' typing and whether the chunks' gradients are stacked."""

    hidden: jax.Array
    classifier: jax.Array
    bias: jax.Array | None
    vocab_mask: jax.Array | None
    rows: Rows
    weights: tuple
    shard: tuple
    rule: row_terms.RuleOptions
    dtypes: tuple
    varying: object
    stacked: bool


def backward(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, statistics,
             g, plan: TilePlan, head_wanted: bool = True):  # fmt: skip
    """Gradients for hidden, classifier and bias, tile by tile through the core's rule.

    Without ``head_wanted`` (neither the classifier nor the bias is differentiated) only
    ``dh`` is computed, in the token-outer pass alone (:func:`hidden_gradient_by_token_chunks`:
    two products per tile, as the one-pass backward less its ``dW`` product, and a ``[T, d]``
    sum instead of an ``[N, d]`` one); the classifier's and bias's gradients are None."""
    given = plan
    (classifier,), plan = tpu_layout.as_computed((classifier,), plan)
    local, num_classes, offset, rule = tile_plan.vocabulary(classifier, plan)
    dtype = row_terms.compute_dtype(jnp.result_type(hidden.dtype, classifier.dtype))
    acc = plan.accumulation_dtype  # never below the inputs' dtype
    acc = classifier.dtype if acc.itemsize < classifier.dtype.itemsize else acc
    num_vc = tile_plan.chunk_starts(local, plan.vocab_chunk)[0]
    weights = tile_plan.with_vocab_mask(class_weights, vocab_mask, num_classes, dtype)
    varying = typed_like_inputs(
        (hidden, classifier, bias, labels, weights[0], row_mask, vocab_mask, statistics, g)
    )
    # When the chunks tile the [V, d] classifier exactly, each chunk's gradient is a row block
    # of the result: the scan stacks them ([V / Vc, Vc, d], reshaped for free) instead of
    # updating a [V, d] buffer in place, which XLA's CPU backend does for bf16 by converting
    # the whole buffer to float32 at every chunk.
    stacked = plan.layout == "vd" and num_vc * plan.vocab_chunk == local
    hidden_acc = row_terms.compute_dtype(hidden.dtype)
    two_passes = jnp.dtype(hidden.dtype).itemsize < hidden_acc.itemsize  # bf16, float16
    sweep = Sweep(
        hidden, classifier, bias, vocab_mask,
        Rows(labels, row_mask, log_sum_exp(statistics), g if plan.companions else (g,)),
        weights,
        (local, num_classes, offset), rule, (dtype, hidden_acc, acc), varying, stacked,
    )  # fmt: skip
    if not head_wanted:
        return hidden_gradient_by_token_chunks(sweep, plan), None, None
    # The classifier's and bias's gradients are summed over the token shards chunk by chunk
    # (vocabulary_step), so their sums are typed like the classifier and bias.
    init = (
        None if two_passes else varying(jnp.zeros(hidden.shape, hidden_acc)),
        None if stacked else typed_like_inputs(classifier)(jnp.zeros_like(classifier)),
        None if bias is None or stacked else typed_like_inputs(bias)(jnp.zeros_like(bias)),
    )
    step = functools.partial(vocabulary_step, sweep, plan)
    (d_hidden, d_classifier, d_bias), chunks = tile_plan.over_chunks(step, init, num_vc)
    if stacked:
        d_classifier = chunks[0].reshape(classifier.shape)
        d_bias = None if bias is None else chunks[1].reshape(bias.shape)
    if two_passes:
        d_hidden = hidden_gradient_by_token_chunks(sweep, plan)
    return d_hidden.astype(hidden.dtype), tpu_layout.as_given(d_classifier, given), d_bias


def log_sum_exp(statistics):
    """``(lse[, H])`` per row from the forward's ``(m, log s[, H])``: ``lse = m + log s``, so
    each tile's softmax is ``exp(x - lse)``, one per-row number where ``exp(x - m) exp(-log
    s)`` needs two (which XLA:TPU computes as a pair, a slot of its own in main memory:
    docs/performance.md)."""
    top, log_sum, *entropy = statistics
    return (top + log_sum, *entropy)


def hidden_gradient_by_token_chunks(sweep: Sweep, plan: TilePlan):
    """``dh`` token chunk by token chunk: ``dh[T] = sum_Vc G W[Vc]`` in float32 ``[T, d]``,
    each token chunk's block in the hidden states' dtype, laid end to end (a moved-back last
    chunk gives only its rows no earlier chunk took)."""
    hidden = sweep.hidden
    (num_tokens, width), tc = hidden.shape, plan.token_chunk
    num_tc, token_start = tile_plan.chunk_starts(num_tokens, tc)
    num_vc, vocab_start = tile_plan.chunk_starts(sweep.shard[0], plan.vocab_chunk)
    compute, hidden_acc, _ = sweep.dtypes

    def token_chunk(_, j):
        t0 = token_start(j)
        hidden_t = operand_chunk(hidden, t0, tc)

        def vocabulary(total, i):
            chunk = vocabulary_chunk(sweep.classifier, sweep.bias, sweep.weights, sweep.shard,
                                     sweep.vocab_mask, plan, i, vocab_start(i))  # fmt: skip
            grad, scale = tile_gradient(plan, sweep.rule, chunk, sweep.rows, hidden_t, t0, j,
                                        compute)  # fmt: skip
            add = lambda total: (
                total
                + tile_plan.hidden_gradient(
                    grad.astype(hidden.dtype), chunk.classifier, plan.layout, hidden_acc
                )
            )
            if plan.gradient_filter is None:
                return add(total), None
            negligible = jnp.all(jnp.abs(grad) <= plan.gradient_filter * scale)
            return lax.cond(negligible, lambda total: total, add, total), None

        zeros = sweep.varying(jnp.zeros((tc, width), hidden_acc))
        total = tile_plan.over_chunks(vocabulary, zeros, num_vc)[0]
        return None, total.astype(hidden.dtype)

    blocks = tile_plan.over_chunks(token_chunk, None, num_tc)[1]
    return joined_token_blocks(blocks, num_tokens)


def joined_token_blocks(blocks, num_tokens: int):
    """``[N, d]`` from the token chunks' ``[num_tc, T, d]`` blocks, laid end to end: a free
    reshape when they tile ``N``; a moved-back last chunk gives only its rows no earlier
    chunk took."""
    num_tc, tc, width = blocks.shape
    if num_tc * tc == num_tokens:
        return blocks.reshape(num_tokens, width)
    whole = blocks[:-1].reshape(-1, width)
    last = blocks[-1][tc - (num_tokens - whole.shape[0]) :]
    return jnp.concatenate([whole, last]) if whole.shape[0] else last


def vocabulary_step(sweep: Sweep, plan: TilePlan, carry, i):
    """Vocabulary chunk ``i`` against every token chunk: ``dh`` accumulated, the chunk's
    ``dW`` and ``db`` written once (or returned, to be stacked)."""
    d_hidden, d_classifier, d_bias = carry
    vc, width = plan.vocab_chunk, sweep.hidden.shape[1]
    v0 = tile_plan.chunk_starts(sweep.shard[0], vc)[1](i)
    chunk = vocabulary_chunk(sweep.classifier, sweep.bias, sweep.weights, sweep.shard,
                             sweep.vocab_mask, plan, i, v0)  # fmt: skip
    acc = sweep.dtypes[2]
    chunk_shape = (vc, width) if plan.layout == "vd" else (width, vc)
    zeros = (jnp.zeros(chunk_shape, acc), None if sweep.bias is None else jnp.zeros((vc,), acc))
    products_dtypes = (sweep.hidden.dtype, sweep.dtypes[1], acc)
    step = lambda inner, j: token_step(plan, sweep.rule, chunk, sweep.rows, sweep.hidden,
                                       products_dtypes, sweep.dtypes[0], inner, j)  # fmt: skip
    num_tc = tile_plan.chunk_starts(sweep.hidden.shape[0], plan.token_chunk)[0]
    run = lambda inner: tile_plan.over_chunks(step, inner, num_tc)[0]
    inner = (d_hidden, *sweep.varying(zeros))
    if sweep.vocab_mask is None:
        d_hidden, d_classifier_c, d_bias_c = run(inner)
    else:  # a chunk of only masked classes adds nothing: skipped
        d_hidden, d_classifier_c, d_bias_c = lax.cond(jnp.any(chunk.fresh), run, lambda x: x, inner)
    d_classifier_c = summed_over_token_shards(d_classifier_c, sweep.classifier)
    d_bias_c = summed_over_token_shards(d_bias_c, sweep.bias)
    if sweep.stacked:  # the chunks are the scan's outputs, laid end to end
        return (d_hidden, None, None), (d_classifier_c, d_bias_c)
    d_classifier = add_chunk(d_classifier, d_classifier_c, v0, vc, 0 if plan.layout == "vd" else 1)
    if d_bias is not None:
        d_bias = add_chunk(d_bias, d_bias_c, v0, vc, 0)
    return (d_hidden, d_classifier, d_bias), None

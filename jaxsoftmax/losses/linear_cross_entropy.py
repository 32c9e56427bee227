"""``linear_cross_entropy``: the classifier layer and the loss fused, never building the logits.

For a large vocabulary the logits ``z = h W^T + b`` (``[N, V]``) and their gradient are
the largest arrays of a training step. This loss computes the same value and gradients as
``cross_entropy(hidden @ classifier.T + bias, labels, ...)`` while holding only one
``[T, Vc]`` tile of logits at a time (``T`` tokens by ``Vc`` classes).

Forward: an online log-sum-exp
------------------------------
For each token chunk the vocabulary chunks are visited in turn. With ``x = cap tanh(z /
cap)`` the (soft-capped) logits of a chunk, each row keeps a running maximum ``m`` and a
running sum ``s = sum exp(x_c - m)`` over the classes seen so far; a new chunk with
maximum ``m_c`` updates them as::

    m' = max(m, m_c)        s' = s exp(m - m') + sum_c exp(x_c - m')

so after the last chunk ``lse = m + log s``. In the same pass each row picks its label's
logit ``x_y`` (in the chunk that owns it) and, with label smoothing, ``S = sum_c w_c x_c``.
The per-row loss is then the core's (:func:`jaxsoftmax.row_terms.row_loss`)::

    loss = (1 - eps) r (lse - x_y) + (eps / V) (W lse - S) + beta r lse^2

with ``r = w[y]`` (1 without class weights) and ``W = sum_c w_c``. The residuals are the
inputs and two numbers per row, ``m`` and ``log s``.

Backward: the same rule, tile by tile
-------------------------------------
For each vocabulary chunk and each token chunk the tile of logits is recomputed and
``row_terms.logits_gradient`` (the core's derived ``dL/dz = ((sum q + 2 beta r lse) s - q) g
(1 - tanh^2)``, given the chunk's offset through ``row_terms.ClassBlock``) turns it into the
tile ``G`` of the logits' gradient, which is consumed at once::

    dh[T] += G W[Vc]        dW[Vc] += G^T h[T]        db[Vc] += sum_T G

``dW[Vc]`` and ``db[Vc]`` are accumulated over the token chunks in ``accumulation_dtype``
(float32 by default) and written once per vocabulary chunk; ``dh`` is accumulated in
float32 over the vocabulary chunks.

Ragged sizes: when ``Vc`` does not divide ``V`` the last chunk is moved back to end at
``V`` and the classes already visited are masked (left out of the sums; their gradient
columns are zeroed); tokens likewise. Nothing is padded or copied, so no array of the
inputs' size is allocated besides the gradients themselves.

This is ``method="recompute"``: four ``N V d`` matrix products. ``method="forward"``
(:mod:`jaxsoftmax.tiles.forward_gradient`) does three, at the price of holding the
classifier's gradient from the forward to the backward; ``"auto"`` chooses by its size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.checks import arrays
from jaxsoftmax.checks.options import (
    check_options,
    check_vocab_mask,
    labels_on_masked_classes_out_of_range,
    reduce_loss,
)
from jaxsoftmax.core import companion_terms, row_terms
from jaxsoftmax.core.cpu_programs import logits_gradient as cpu_logits_gradient
from jaxsoftmax.core.cpu_programs import per_platform, slice_chunk
from jaxsoftmax.core.varying_axes import summed_like, typed_like_inputs, whole_cotangent
from jaxsoftmax.tiles import forward_gradient
from jaxsoftmax.tiles import plan as tile_plan
from jaxsoftmax.tiles.plan import TilePlan
from jaxsoftmax.tiles.sizes import on_each_platform, tiles_by_platform

LAYOUTS = ("vd", "dv")
METHODS = ("auto", "recompute", "forward")


def _track_companions(tracked, top, total, shift, x_fresh, exponentials, chunk_top, first):
    """One chunk's update of the companions' running numbers (``return_aux``): ``a = sum_c
    e^(x_c - m) (x_c - m)`` rescaled to the new maximum like the sum of exponentials,
    ``a' = e^(m - m') (a + (m - m') s) + sum_new e^(x_c - m') (x_c - m')``, and the first
    class of largest logit (``first`` is the chunk's global first class)."""
    shifted_sum, best, best_class = tracked
    delta = jnp.where(jnp.isfinite(top), top - shift, 0.0)
    shifted = jnp.where(exponentials > 0, exponentials * (x_fresh - shift[:, None]), 0.0)
    shifted_sum = jnp.exp(delta) * (shifted_sum + delta * total) + jnp.sum(shifted, axis=-1)
    better = chunk_top > best  # strictly: an earlier class keeps a tie
    chunk_class = (first + jnp.argmax(x_fresh, axis=-1)).astype(jnp.int32)
    return [shifted_sum, jnp.maximum(best, chunk_top), jnp.where(better, chunk_class, best_class)]


def _combine_companions(tracked, top, total, axis_name):
    """The vocabulary shards' companions per row: ``a`` rescaled to the global maximum and
    summed, and the smallest class holding the global largest logit."""
    shifted_sum, best, best_class = tracked
    global_top = lax.pmax(top, axis_name)
    delta = jnp.where(
        jnp.isfinite(top), top - jnp.where(jnp.isfinite(global_top), global_top, 0.0), 0.0
    )
    shifted_sum = lax.psum(jnp.exp(delta) * (shifted_sum + delta * total), axis_name)
    holder = best == global_top
    best_class = jnp.where(holder, best_class, jnp.iinfo(jnp.int32).max)
    return [shifted_sum, global_top, lax.pmin(best_class, axis_name)]


def _forward(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, plan: TilePlan):
    """Per-row loss ``[N]`` and the residual statistics ``(m [N], log s [N])``."""
    options = plan.options
    num_tokens = hidden.shape[0]
    local_classes, num_classes, offset, rule = tile_plan.vocabulary(classifier, plan)
    dtype = row_terms.compute_dtype(jnp.result_type(hidden.dtype, classifier.dtype))
    tc, vc = plan.token_chunk, plan.vocab_chunk
    num_tc, token_start = tile_plan.chunk_starts(num_tokens, tc)
    num_vc, vocab_start = tile_plan.chunk_starts(local_classes, vc)
    eps = options.label_smoothing
    options_companions = plan.companions
    class_weights, participating = tile_plan.with_vocab_mask(class_weights, vocab_mask, num_classes, dtype)
    varying = typed_like_inputs((hidden, classifier, bias, labels, class_weights, vocab_mask))

    def token_step(outputs, j):
        t0 = token_start(j)
        hidden_t = slice_chunk(hidden, t0, tc)
        labels_t = lax.dynamic_slice_in_dim(labels, t0, tc)

        def vocab_step(carry, i):
            if vocab_mask is None:
                return tile(carry, i)
            # Tiles of only masked classes (a padded vocabulary's end) are skipped.
            live = jnp.any(
                tile_plan.visited(vocab_start(i), i, vc, offset, num_classes, options, vocab_mask)
            )
            return lax.cond(live, tile, lambda carry, i: (carry, None), carry, i)

        def tile(carry, i):
            top, total, label_x, weighted, *tracked = carry
            v0 = vocab_start(i)
            bias_c = None if bias is None else lax.dynamic_slice_in_dim(bias, v0, vc)
            z = tile_plan.tile_logits(
                hidden_t,
                tile_plan.classifier_chunk(classifier, v0, vc, plan.layout),
                bias_c,
                plan.layout,
                dtype,
            )
            x = row_terms.capped(z, options)
            fresh = tile_plan.visited(v0, i, vc, offset, num_classes, options, vocab_mask)
            x_fresh = jnp.where(fresh[None, :], x, -jnp.inf)
            chunk_top = jnp.max(x_fresh, axis=-1)
            new_top = jnp.maximum(top, chunk_top)
            shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # -inf: no class counted yet
            exponentials = jnp.exp(x_fresh - shift[:, None])
            if options_companions:
                tracked = _track_companions(
                    tracked, top, total, shift, x_fresh, exponentials, chunk_top, offset + v0
                )
            total = total * jnp.exp(top - shift) + jnp.sum(exponentials, axis=-1)
            index = labels_t - (offset + v0)
            owned = (index >= 0) & (index < vc)
            picked = jnp.take_along_axis(x, jnp.clip(index, 0, vc - 1)[:, None], axis=-1)[:, 0]
            label_x = jnp.where(owned, picked, label_x)
            if eps:
                w = (
                    jnp.ones((vc,), dtype)
                    if class_weights is None
                    else lax.dynamic_slice_in_dim(class_weights, offset + v0, vc).astype(dtype)
                )
                weighted = weighted + jnp.sum(
                    jnp.where(fresh[None, :], x * w[None, :], 0.0), axis=-1
                )
            return (new_top, total, label_x, weighted, *tracked), None

        init = [jnp.full((tc,), -jnp.inf, dtype)] + [jnp.zeros((tc,), dtype)] * 3
        if options_companions:  # sum_c e^(x_c - m) (x_c - m), the best logit and its class
            init += [jnp.zeros((tc,), dtype), jnp.full((tc,), -jnp.inf, dtype)]
            init += [jnp.zeros((tc,), jnp.int32)]
        stats, _ = lax.scan(vocab_step, varying(tuple(init)), jnp.arange(num_vc, dtype=jnp.int32))
        # Rows of a moved-back last token chunk are recomputed identically: overwriting is exact.
        outputs = tuple(
            lax.dynamic_update_slice_in_dim(o, s, t0, 0) for o, s in zip(outputs, stats)
        )
        return outputs, None

    init = [jnp.zeros((num_tokens,), dtype) for _ in range(4)]
    if options_companions:
        init += [jnp.zeros((num_tokens,), dtype)] * 2 + [jnp.zeros((num_tokens,), jnp.int32)]
    (top, total, label_x, weighted, *tracked), _ = lax.scan(
        token_step, varying(tuple(init)), jnp.arange(num_tc, dtype=jnp.int32)
    )
    if options_companions and options.axis_name is not None:
        tracked = _combine_companions(tracked, top, total, options.axis_name)
    if options.axis_name is not None:
        # The vocabulary shards' statistics, combined per row: a pmax, then one psum of the
        # rescaled sums, the label logits (0 on every shard but the owner's) and the smoothing
        # sums. Nothing else in the loss crosses devices.
        local_top, top = top, lax.pmax(top, options.axis_name)
        total = total * jnp.exp(local_top - jnp.where(jnp.isfinite(top), top, 0.0))
        if eps:
            total, label_x, weighted = lax.psum((total, label_x, weighted), options.axis_name)
        else:
            total, label_x = lax.psum((total, label_x), options.axis_name)

    # The per-row loss from the statistics, by the core's formula (jaxsoftmax.row_terms.row_loss).
    top, log_sum = top[:, None], jnp.log(total)[:, None]
    r = row_terms.row_weight(labels, class_weights, num_classes, dtype, rule)
    smoothing = None
    if eps:  # sum_c w_c (lse - x_c), from the running sum_c w_c x_c
        weight_total = (
            num_classes if class_weights is None else jnp.sum(class_weights.astype(dtype))
        )
        smoothing = weight_total * (top + log_sum) - weighted[:, None]
    label_shifted = label_x[:, None] - top
    cross = row_terms.label_cross_entropy(log_sum, label_shifted, smoothing, r, participating, rule)
    live = None if row_mask is None else row_mask[:, None]
    bad = row_terms.bad_label_rows(labels, row_mask, num_classes, rule)
    loss = row_terms.row_loss((top, log_sum), cross, r, live, bad, rule)
    statistics = (top[:, 0], log_sum[:, 0])
    if not options_companions:
        return loss, statistics
    shifted_sum, _, best_class = tracked  # H = log_sum - a / s (see jaxsoftmax.core.companion_terms)
    lse, entropy = top + log_sum, log_sum - (shifted_sum / total)[:, None]
    correct = (best_class == labels)[:, None]
    if live is not None:
        lse, entropy = jnp.where(live, lse, 0.0), jnp.where(live, entropy, 0.0)
        correct = correct & live
    return loss, statistics, (lse[:, 0], entropy[:, 0], correct[:, 0])


def _backward(
    hidden,
    classifier,
    bias,
    labels,
    class_weights,
    row_mask,
    vocab_mask,
    statistics,
    g,
    plan: TilePlan,
):
    """Gradients for hidden, classifier and bias, tile by tile through the core's rule."""
    num_tokens, width = hidden.shape
    vocab_axis = 0 if plan.layout == "vd" else 1
    local_classes, num_classes, offset, rule = tile_plan.vocabulary(classifier, plan)
    dtype = row_terms.compute_dtype(jnp.result_type(hidden.dtype, classifier.dtype))
    acc = plan.accumulation_dtype  # never below the inputs' dtype
    if acc.itemsize < classifier.dtype.itemsize:
        acc = classifier.dtype
    hidden_acc = row_terms.compute_dtype(hidden.dtype)
    tc, vc = plan.token_chunk, plan.vocab_chunk
    num_tc, token_start = tile_plan.chunk_starts(num_tokens, tc)
    num_vc, vocab_start = tile_plan.chunk_starts(local_classes, vc)
    top, log_sum, *entropy = statistics  # the entropy too with companions
    class_weights, participating = tile_plan.with_vocab_mask(class_weights, vocab_mask, num_classes, dtype)
    cotangents = g if plan.companions else (g,)
    chunk_shape = (vc, width) if plan.layout == "vd" else (width, vc)
    varying = typed_like_inputs(
        (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, statistics, g)
    )

    def vocab_step(carry, i):
        d_hidden, d_classifier, d_bias = carry
        v0 = vocab_start(i)
        classifier_c = tile_plan.classifier_chunk(classifier, v0, vc, plan.layout)
        bias_c = None if bias is None else lax.dynamic_slice_in_dim(bias, v0, vc)
        weights_c = (
            None
            if class_weights is None
            else lax.dynamic_slice_in_dim(class_weights, offset + v0, vc)
        )
        block = row_terms.ClassBlock(offset + v0, num_classes, class_weights, participating)
        fresh = tile_plan.visited(v0, i, vc, offset, num_classes, plan.options, vocab_mask)

        def token_step(inner, j):
            d_hidden, d_classifier_c, d_bias_c = inner
            t0 = token_start(j)
            hidden_t = slice_chunk(hidden, t0, tc)
            rows = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, t0, tc)
            # Rows of a moved-back last chunk that an earlier chunk already took get g = 0.
            fresh_rows = (t0 + lax.broadcasted_iota(jnp.int32, (tc,), 0)) >= j * tc
            g_t, *g_companions = (jnp.where(fresh_rows, rows(c), 0.0) for c in cotangents)
            z = tile_plan.tile_logits(hidden_t, classifier_c, bias_c, plan.layout, dtype)
            gradient_here = per_platform(
                row_terms.logits_gradient, cpu_logits_gradient, options=rule, block=block
            )
            statistics_t = (rows(top)[:, None], rows(log_sum)[:, None])
            grad = gradient_here(
                z, rows(labels), None, weights_c, rows(row_mask), statistics_t, g_t
            )
            if plan.companions:  # + s (g_lse - g_H (log s + H)), jaxsoftmax.core.companion_terms
                live_t = None if row_mask is None else rows(row_mask)[:, None]
                grad = grad.astype(dtype) + companion_terms.companions_gradient(
                    row_terms.capped(z, rule), statistics_t, rows(entropy[0]), *g_companions,
                    None, live_t, rule,
                )  # fmt: skip
            grad = jnp.where(fresh[None, :], grad, 0.0)
            if plan.gradient_filter is None:
                return products(inner, t0, hidden_t, grad), None
            # Opt-in filtering: a tile whose every entry is below eps times its row's
            # cotangent (softmax below eps, no label) adds nothing to the products.
            scale = sum(jnp.abs(c) for c in (g_t, *g_companions))[:, None]
            negligible = jnp.all(jnp.abs(grad) <= plan.gradient_filter * scale)
            keep = lambda inner: products(inner, t0, hidden_t, grad)
            return lax.cond(negligible, lambda inner: inner, keep, inner), None

        def products(inner, t0, hidden_t, grad):
            """``dh[T] += G W[Vc]``, ``dW[Vc] += G^T h[T]``, ``db[Vc] += sum G``."""
            d_hidden, d_classifier_c, d_bias_c = inner
            # The matrix products run in the inputs' dtype, as the naive composition's do.
            grad_in = grad.astype(hidden.dtype)
            d_hidden_t = lax.dot_general(
                grad_in,
                classifier_c,
                (((1,), (vocab_axis,)), ((), ())),
                preferred_element_type=hidden_acc,
            )
            d_hidden = lax.dynamic_update_slice_in_dim(
                d_hidden, lax.dynamic_slice_in_dim(d_hidden, t0, tc) + d_hidden_t, t0, 0
            )
            if plan.layout == "vd":  # G^T h: [Vc, d]
                d_classifier_c = d_classifier_c + lax.dot_general(
                    grad_in, hidden_t, (((0,), (0,)), ((), ())), preferred_element_type=acc
                )
            else:  # h^T G: [d, Vc]
                d_classifier_c = d_classifier_c + lax.dot_general(
                    hidden_t, grad_in, (((0,), (0,)), ((), ())), preferred_element_type=acc
                )
            if d_bias_c is not None:
                d_bias_c = d_bias_c + jnp.sum(grad.astype(acc), axis=0)
            return d_hidden, d_classifier_c, d_bias_c

        inner = (
            d_hidden,
            *varying(
                (jnp.zeros(chunk_shape, acc), None if bias is None else jnp.zeros((vc,), acc))
            ),
        )
        run = lambda inner: lax.scan(token_step, inner, jnp.arange(num_tc, dtype=jnp.int32))[0]
        if vocab_mask is None:
            d_hidden, d_classifier_c, d_bias_c = run(inner)
        else:  # a chunk of only masked classes adds nothing: skipped
            d_hidden, d_classifier_c, d_bias_c = lax.cond(jnp.any(fresh), run, lambda x: x, inner)
        d_classifier_c = d_classifier_c.astype(classifier.dtype)
        d_bias_c = None if bias is None else d_bias_c.astype(bias.dtype)
        if stacked:  # the chunks are the scan's outputs, laid end to end below
            return (d_hidden, None, None), (d_classifier_c, d_bias_c)
        # Classes already written by an earlier chunk got exactly 0 here: adding is exact.
        d_classifier = lax.dynamic_update_slice_in_dim(
            d_classifier,
            tile_plan.classifier_chunk(d_classifier, v0, vc, plan.layout) + d_classifier_c,
            v0,
            vocab_axis,
        )
        if d_bias is not None:
            d_bias = lax.dynamic_update_slice_in_dim(
                d_bias, lax.dynamic_slice_in_dim(d_bias, v0, vc) + d_bias_c, v0, 0
            )
        return (d_hidden, d_classifier, d_bias), None

    # When the chunks tile the [V, d] classifier exactly, each chunk's gradient is a row block
    # of the result: the scan stacks them ([V / Vc, Vc, d], reshaped for free) instead of
    # updating a [V, d] buffer in place, which XLA's CPU backend does for bf16 by converting
    # the whole buffer to float32 at every chunk.
    stacked = plan.layout == "vd" and num_vc * vc == local_classes
    init = varying(
        (
            jnp.zeros(hidden.shape, hidden_acc),
            None if stacked else jnp.zeros_like(classifier),
            None if bias is None or stacked else jnp.zeros_like(bias),
        )
    )
    (d_hidden, d_classifier, d_bias), chunks = lax.scan(
        vocab_step, init, jnp.arange(num_vc, dtype=jnp.int32)
    )
    if stacked:
        d_classifier = chunks[0].reshape(classifier.shape)
        d_bias = None if bias is None else chunks[1].reshape(bias.shape)
    return d_hidden.astype(hidden.dtype), d_classifier, d_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _linear_rows(
    hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, plan: TilePlan
):
    """Per-row loss ``[N]`` of ``hidden [N, d]`` against the classifier, by the rule; with
    ``plan.companions``, ``(loss, lse, entropy, correct)``."""
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
    return _linear_rows_fwd(*args, plan)[0]


def _linear_rows_fwd(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, plan):
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
    loss, statistics, *companions = on_each_platform(_forward, plan, *args)
    out = loss
    if plan.companions:  # (loss, lse, entropy, correct); the entropy is a residual too
        (lse, entropy, correct), statistics = companions[0], (*statistics, companions[0][1])
        out = (loss, lse, entropy, correct)
    return out, (*args, statistics)


def _linear_rows_bwd(plan, residuals, g):
    hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, statistics = residuals
    axis_name = plan.options.axis_name
    if plan.companions:
        g = tuple(whole_cotangent(c, classifier, axis_name) for c in g[:3])
    else:
        g = whole_cotangent(g, classifier, axis_name)
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, statistics, g)
    d_hidden, d_classifier, d_bias = on_each_platform(_backward, plan, *args)
    d_hidden, d_classifier, d_bias = (
        summed_like(d, x)
        for d, x in ((d_hidden, hidden), (d_classifier, classifier), (d_bias, bias))
    )
    d_weights = None if class_weights is None else jnp.zeros_like(class_weights)
    return d_hidden, d_classifier, d_bias, None, d_weights, None, None


_linear_rows.defvjp(_linear_rows_fwd, _linear_rows_bwd)


def _check_gradient_filter(value, dtype):
    """``gradient_filter`` as a positive float or None; ``"auto"`` is ``eps(dtype) / 32``."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f'gradient_filter must be None, a float > 0 or "auto"; got {value!r}.')
        return float(jnp.finfo(dtype).eps) / 32
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'gradient_filter must be None, a float > 0 or "auto"; got {value!r}.')
    return float(value)


def _check_chunk(value, name: str):
    if value is None:
        return None
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a positive int or None (automatic); got "
            f"{type(value).__name__} {value!r}."
        ) from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None (automatic); got {value}.")
    return value


def _check_float(x, name: str):
    x = arrays.as_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got {arrays.describe(x)}.")
    return x


def linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    classifier_layout: str = "vd",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    accumulation_dtype=jnp.float32,
    method: str = "auto",
    return_aux: bool = False,
    vocab_mask: jax.typing.ArrayLike | None = None,
    gradient_filter: float | str | None = None,
) -> jax.Array | tuple[jax.Array, companion_terms.LossAux]:
    r"""Softmax cross-entropy of a linear classifier's logits, without building the logits.

    The value and every gradient equal those of the naive composition

    .. math::

       z = h W^\top + b, \qquad \mathrm{cross\_entropy}(z, y, \dots),

    with the backward from the same derived rule, ``dL/dz = softmax(z) - q`` (with the
    options' terms), applied to one recomputed ``[token_chunk, vocab_chunk]`` tile of logits
    at a time and contracted at once into ``dL/dh = G W``, ``dL/dW = G^T h`` and
    ``dL/db = sum_n G_n``. No ``N x V`` array is allocated in the forward or the backward.

    Args:
      hidden: float ``[..., d]``, the last hidden states.
      classifier: float ``[V, d]`` (``classifier_layout="vd"``, a tied embedding table) or
        ``[d, V]`` (``"dv"``, a Dense kernel ``h @ kernel``), the dtype of ``hidden``.
      labels: integer class indices ``[...]`` (``hidden``'s shape without ``d``).
      bias: float ``[V]`` or None.
      where: bool ``[...]``, the examples to count. (A per-class mask of shape
        ``[..., V]`` would itself be an ``N x V`` array and is not accepted.)
      ignore_index, label_smoothing, class_weights, z_loss, logit_softcap, reduction: as in
        :func:`jaxsoftmax.cross_entropy`.
      classifier_layout: ``"vd"`` or ``"dv"``; the ``"dv"`` kernel is read in column blocks,
        never transposed as a whole.
      token_chunk, vocab_chunk: the tile ``T x Vc``; None picks
        each backend's tile, chosen when the program is lowered (:mod:`jaxsoftmax.tiles.sizes`:
        at most ``1024 x 1024`` on a CPU or TPU, ``1024 x 2048`` on a GPU; ``Vc`` divides
        ``V`` where it can).
        With ``method="forward"``, ``token_chunk`` is the rows per block (None:
        ``min(N, 2**24 // V)``) and ``vocab_chunk`` is not used.
      accumulation_dtype: dtype the classifier's and bias's gradients are summed in over
        the token chunks (float32 by default: bf16 sums lose small contributions); never
        below the inputs' dtype. ``hidden``'s gradient is summed in float32 (or float64).
      method: how the gradients are computed (the values are the same):

        * ``"recompute"``: the forward keeps two numbers per row; the backward recomputes
          each tile of logits. Four ``N V d`` matrix products; memory: a few tiles.
        * ``"forward"``: the gradients are computed in the forward, from blocks of
          ``token_chunk`` whole rows of logits (:mod:`jaxsoftmax.tiles.forward_gradient`).
          Three products, as the naive path; holds the classifier's gradient, ``[V, d]``
          in ``accumulation_dtype``, from the forward to the backward. Scalar reductions
          only (``"mean"``, ``"sum"``).
        * ``"auto"`` (default): ``"forward"`` for a scalar reduction when
          ``V * d <= 2**26`` (an accumulator of at most 256 MiB in float32), else
          ``"recompute"``. Large vocabularies thus get the least memory, small ones speed.
      return_aux: also return a :class:`~jaxsoftmax.LossAux` of per-example arrays
        (``lse``, ``z_loss``, ``correct``, ``entropy``, ``hidden``'s shape without ``d``),
        from the tiles the loss visits anyway: no second pass over the vocabulary, no
        ``[N, V]`` array. ``lse`` and ``entropy`` are differentiable through the same rule
        (their cotangents add ``softmax * (g_lse - g_H (log softmax + H))`` to each tile's
        gradient). With ``method="forward"`` they come from its blocks' whole rows, and
        their cotangents, known only in the backward, cost one more tile-by-tile pass when
        any is nonzero (none when the companions are only logged).
      vocab_mask: bool ``[V]``, the classes that exist (a vocabulary padded to a multiple of
        64 or 128, as GPT-2's 50257 to 50304): masked classes get no probability, no
        label-smoothing mass, and their classifier rows (and bias) a zero gradient; tiles
        holding only masked classes are skipped. A label on a masked class is a bad label
        (NaN). Equal to :func:`~jaxsoftmax.cross_entropy` of the logits with ``vocab_mask``.
      gradient_filter: None (default: the exact gradient), a float ``eps > 0`` or
        ``"auto"`` (``eps`` = the inputs' dtype resolution / 32, Cut Cross-Entropy's
        choice: 2**-12 for bf16). The backward skips the matrix products of a tile whose
        every gradient entry is at most ``eps`` times its row's cotangent: softmax entries
        below ``eps`` and no label (for the plain loss). An approximation: the skipped
        entries are dropped from ``dL/dh`` and ``dL/dW`` (measured errors in
        docs/linear-cross-entropy.md). Needs ``method="recompute"`` (``"auto"`` takes it).

    There is no ``axis_name``: for a classifier split by vocabulary over a device mesh, use
    :func:`jaxsoftmax.sharded_linear_cross_entropy`, which combines the shards' per-row
    statistics (calling this loss on one shard's rows would normalize over that shard only).

    Returns:
      The reduced loss, or one loss per example with ``reduction="none"``, in ``hidden``'s
      dtype. Statistics are float32 (float64 for float64 inputs) whatever the inputs' dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsoftmax import cross_entropy
      >>> h = jax.random.normal(jax.random.key(0), (6, 4))
      >>> W = jax.random.normal(jax.random.key(1), (10, 4))
      >>> y = jnp.array([0, 3, 9, 2, 2, 7])
      >>> fused = linear_cross_entropy(h, W, y, token_chunk=4, vocab_chunk=3)
      >>> print(bool(jnp.allclose(fused, cross_entropy(h @ W.T, y), atol=1e-5)))
      True
    """
    call = _validated(
        hidden,
        classifier,
        labels,
        bias=bias,
        where=where,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        reduction=reduction,
        classifier_layout=classifier_layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        accumulation_dtype=accumulation_dtype,
        vocab_mask=vocab_mask,
    )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    return_aux = arrays.check_flag(return_aux, "return_aux")
    eps = _check_gradient_filter(gradient_filter, call.hidden.dtype)
    call = call._replace(gradient_filter=eps)
    if method == "forward" and eps is not None:
        raise ValueError(
            'method="forward" cannot filter the gradient: it computes whole rows, not tiles. '
            f'Use method="recompute" or "auto" with gradient_filter={gradient_filter!r}.'
        )
    if method == "forward" and call.reduction == "none":
        raise ValueError(
            'method="forward" needs reduction="mean" or "sum" (the gradients are computed '
            'before the per-row cotangents are known); got reduction="none". Use '
            'method="recompute" or "auto".'
        )
    plan = make_plan(call, call.hidden.shape[0], call.num_classes, companions=return_aux)
    tiles_only = eps is not None  # what "forward" cannot do
    if not tiles_only and choose_method(call, method) == "forward" and call.hidden.shape[0] > 0:
        out = _reduced_by_forward_gradient(call, plan)
        if not return_aux:
            return out.astype(call.hidden.dtype)
        out, lse, entropy, correct = out
        r = row_terms.row_weight(
            call.labels, call.class_weights, call.num_classes, lse.dtype, plan.options
        )
        r = jnp.broadcast_to(r, (lse.shape[0], 1))[:, 0]
        aux = companion_terms.loss_aux(lse, entropy, correct, r, plan.options.z_loss)
        return out.astype(call.hidden.dtype), jax.tree.map(lambda a: a.reshape(call.batch), aux)
    loss, weight, *aux = rows_and_weights(
        call.hidden,
        call.classifier,
        call.bias,
        call.labels,
        call.class_weights,
        call.row_mask,
        plan,
        call.vocab_mask,
    )
    out = reduce_loss(loss.reshape(call.batch), weight.reshape(call.batch), call.reduction)
    out = out.astype(call.hidden.dtype)
    if not return_aux:
        return out
    return out, jax.tree.map(lambda a: a.reshape(call.batch), aux[0])


class _Call(NamedTuple):
    """A call's arguments, checked: tokens flattened, ``where`` and ``ignore_index`` merged."""

    hidden: jax.Array  # [N, d]
    classifier: jax.Array
    labels: jax.Array  # [N]
    bias: jax.Array | None
    class_weights: jax.Array | None
    row_mask: jax.Array | None  # [N] or None
    batch: tuple  # hidden's shape without d
    num_classes: int
    reduction: str
    options: row_terms.RuleOptions
    layout: str
    token_chunk: int | None
    vocab_chunk: int | None
    accumulation_dtype: jnp.dtype
    vocab_mask: jax.Array | None = None  # [V], the classes that exist
    gradient_filter: float | None = None


def make_plan(
    call: _Call, num_tokens: int, num_local: int, axis_name=None, companions=False
) -> TilePlan:
    """The plan for ``num_tokens`` rows against ``num_local`` classes (one shard's, when the
    vocabulary is split over ``axis_name``), with the call's chunks or each backend's."""
    tiles = tiles_by_platform(num_tokens, num_local, call.token_chunk, call.vocab_chunk)
    _, token_chunk, vocab_chunk = next(t for t in tiles if t[0] == "default")
    return TilePlan(
        options=dataclasses.replace(call.options, axis_name=axis_name),
        layout=call.layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        accumulation_dtype=call.accumulation_dtype,
        num_classes=None if axis_name is None else call.num_classes,
        tiles=tiles,
        companions=companions,
        gradient_filter=call.gradient_filter,
    )


def rows_and_weights(
    hidden, classifier, bias, labels, class_weights, row_mask, plan: TilePlan, vocab_mask=None
):
    """Per-row losses ``[N]`` and mean weights ``[N]`` (``w[label]`` or 1; 0 where masked).

    With ``plan.options.axis_name`` (inside ``shard_map``): ``classifier`` and ``bias`` are
    this shard's classes, ``class_weights`` all ``V`` of them (padded like the classifier).
    """
    num_tokens = hidden.shape[0]
    _, num_classes, _, rule = tile_plan.vocabulary(classifier, plan)
    dtype = row_terms.compute_dtype(hidden.dtype)
    if num_tokens == 0:
        empty = jnp.zeros((0,), dtype)
        out = (empty, empty, empty, empty.astype(bool)) if plan.companions else empty
    else:
        args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
        out = _linear_rows(*args, plan)
    weight = _mean_weights(labels, class_weights, row_mask, num_classes, dtype, rule)
    if not plan.companions:
        return out, weight
    loss, lse, entropy, correct = out
    r = row_terms.row_weight(labels, class_weights, num_classes, dtype, rule)
    r = jnp.broadcast_to(r, (num_tokens, 1))[:, 0]
    return loss, weight, companion_terms.loss_aux(lse, entropy, correct, r, rule.z_loss)


def _mean_weights(labels, class_weights, row_mask, num_classes: int, dtype, options):
    """Each row's weight in the mean, ``[N]``: ``w[label]`` (1 without class weights), 0 where
    ``row_mask`` drops the row."""
    weight = row_terms.row_weight(labels, class_weights, num_classes, dtype, options)
    weight = jnp.broadcast_to(weight, (labels.shape[0], 1))[:, 0]
    if row_mask is not None:
        weight = jnp.where(row_mask, weight, 0.0)
    return weight


def choose_method(call: _Call, method: str) -> str:
    """The method ``"auto"`` stands for with these arguments (see
    :func:`linear_cross_entropy`); other methods are returned as they are."""
    if method != "auto":
        return method
    return forward_gradient.auto_method(call.num_classes, call.hidden.shape[-1], call.reduction)


def _loss_rows(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, plan: TilePlan):
    """Per-row losses by the online forward, nothing differentiated."""
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
    return on_each_platform(_forward, plan, *args)[0]


def _reduced_by_forward_gradient(call: _Call, plan: TilePlan):
    """The reduced loss, its gradients computed in the forward (``method="forward"``)."""
    num_tokens = call.hidden.shape[0]
    rows = call.token_chunk or forward_gradient.default_block(num_tokens, call.num_classes)
    block_plan = dataclasses.replace(plan, token_chunk=min(rows, num_tokens))
    dtype = row_terms.compute_dtype(call.hidden.dtype)
    weight = _mean_weights(
        call.labels, call.class_weights, call.row_mask, call.num_classes, dtype, plan.options
    )
    return forward_gradient.reduced_loss(
        call.hidden,
        call.classifier,
        call.bias,
        call.labels,
        call.class_weights,
        call.row_mask,
        call.vocab_mask,
        weight,
        call.reduction,
        block_plan,
        functools.partial(_loss_rows, plan=plan),
        functools.partial(_recompute_backward, plan=plan) if plan.companions else None,
    )


def _recompute_backward(*args, plan: TilePlan):
    """The default path's backward, tile by tile (``method="forward"`` uses it for the
    companions' cotangents, which arrive only in the backward)."""
    return on_each_platform(_backward, plan, *args)


def _validated(
    hidden,
    classifier,
    labels,
    *,
    bias,
    where,
    ignore_index,
    label_smoothing,
    class_weights,
    z_loss,
    logit_softcap,
    reduction,
    classifier_layout,
    token_chunk,
    vocab_chunk,
    accumulation_dtype,
    vocab_mask=None,
) -> _Call:
    """Checks :func:`linear_cross_entropy`'s arguments (see there) and flattens the tokens."""
    hidden = _check_float(hidden, "hidden")
    classifier = _check_float(classifier, "classifier")
    if classifier_layout not in LAYOUTS:
        raise ValueError(
            f"classifier_layout must be one of {LAYOUTS} ([V, d] or [d, V]); got "
            f"{classifier_layout!r}."
        )
    if hidden.ndim < 1:
        raise ValueError("hidden must have a feature axis, shape [..., d]; got a scalar.")
    width = hidden.shape[-1]
    expected = "[V, d]" if classifier_layout == "vd" else "[d, V]"
    feature_axis = 1 if classifier_layout == "vd" else 0
    if classifier.ndim != 2 or classifier.shape[feature_axis] != width:
        hint = ""
        if classifier.ndim == 2 and classifier.shape[1 - feature_axis] == width:
            other = "dv" if classifier_layout == "vd" else "vd"
            hint = f" It looks transposed: pass classifier_layout={other!r}."
        raise ValueError(
            f"classifier must have shape {expected} with d = {width} (hidden's last axis) for "
            f"classifier_layout={classifier_layout!r}; got {arrays.describe(classifier)}.{hint}"
        )
    if classifier.dtype != hidden.dtype:
        raise TypeError(
            f"classifier must have hidden's dtype {jnp.dtype(hidden.dtype).name}; got "
            f"{arrays.describe(classifier)}. Cast one of them."
        )
    num_classes = classifier.shape[1 - feature_axis]
    batch = hidden.shape[:-1]
    labels = arrays.as_array(labels, "labels")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices of shape {batch}; got "
            f"{arrays.describe(labels)}. Probability targets would be an N x V array."
        )
    if tuple(labels.shape) != batch:
        raise ValueError(
            f"labels must have hidden's shape without the feature axis, {batch}; "
            f"got {arrays.describe(labels)}. Nothing is broadcast."
        )
    if bias is not None:
        bias = _check_float(bias, "bias")
        if tuple(bias.shape) != (num_classes,):
            raise ValueError(
                f"bias must have one entry per class, shape ({num_classes},); got "
                f"{arrays.describe(bias)}."
            )
    row_mask = None
    if where is not None:
        where = arrays.as_array(where, "where")
        if where.dtype != jnp.bool_ or tuple(where.shape) != batch:
            raise ValueError(
                f"where must be a boolean array of one entry per example, shape {batch}; got "
                f"{arrays.describe(where)}. (A per-class mask would be an N x V array.)"
            )
        row_mask = where
    loss_options, class_weights = check_options(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        reduction=reduction,
        num_classes=num_classes,
    )
    ignore_index, reduction = loss_options.ignore_index, loss_options.reduction
    options = loss_options.rule()
    token_chunk = _check_chunk(token_chunk, "token_chunk")
    vocab_chunk = _check_chunk(vocab_chunk, "vocab_chunk")
    try:
        accumulation_dtype = jnp.dtype(accumulation_dtype)
    except TypeError:
        raise TypeError(
            f"accumulation_dtype must be a float dtype; got {accumulation_dtype!r}."
        ) from None
    if not jnp.issubdtype(accumulation_dtype, jnp.floating):
        raise TypeError(f"accumulation_dtype must be a float dtype; got {accumulation_dtype}.")

    vocab_mask = check_vocab_mask(vocab_mask, num_classes)

    num_tokens = math.prod(batch)
    if ignore_index is not None:
        kept = labels.reshape(num_tokens) != ignore_index
        row_mask = kept if row_mask is None else row_mask.reshape(num_tokens) & kept
    elif row_mask is not None:
        row_mask = row_mask.reshape(num_tokens)
    if vocab_mask is not None:  # a label on a class that does not exist is a bad label
        labels = labels_on_masked_classes_out_of_range(labels, vocab_mask, ignore_index)
    return _Call(
        hidden=hidden.reshape(num_tokens, width),
        classifier=classifier,
        labels=labels.reshape(num_tokens),
        bias=bias,
        class_weights=class_weights,
        row_mask=row_mask,
        batch=batch,
        num_classes=num_classes,
        reduction=reduction,
        options=options,
        layout=classifier_layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        accumulation_dtype=accumulation_dtype,
        vocab_mask=vocab_mask,
    )

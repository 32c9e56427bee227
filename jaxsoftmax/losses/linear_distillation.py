"""``linear_distillation_loss``: both classifiers and the distillation loss fused, tile by tile.

Distillation builds two ``[N, V]`` logits, the student's ``z_s = h_s W_s^T + b_s`` and the
teacher's ``z_t = h_t W_t^T + b_t``. This loss computes the same value and gradients as
``distillation_loss(z_s, z_t, ...)`` while holding one ``[T, Vc]`` tile of each at a time,
by the chunking of :mod:`jaxsoftmax.losses.linear_cross_entropy` and the rule of
:mod:`jaxsoftmax.core.divergences` (``a = z_s / T``, ``b = z_t / T``, ``p = softmax(a)``,
``q = softmax(b)``).

Forward: online statistics of both softmaxes
--------------------------------------------
Each token chunk visits the vocabulary chunks in turn, keeping per row the running maximum
and sum of exponentials of ``a`` and of ``b`` (rescaled when the maximum grows, as in the
fused cross-entropy), so that ``lse(a) = m_a + log s_a`` and ``lse(b) = m_b + log s_b`` at
the end. For forward KL the same pass accumulates the cross term relative to the running
maxima (so that a small KL between large logits is not lost to cancellation)::

    A = sum_c exp(b_c - m_b) ((b_c - m_b) - (a_c - m_a))
    A' = exp(m_b - m_b') (A + ((m_b - m_b') - (m_a - m_a')) s_b) + sum_new (the same, at m')
    KL(q || p) = A / s_b - log s_b + log s_a

(reverse KL: the same with the roles of ``a`` and ``b`` swapped). The JSD's mixture ``m``
needs both final ``lse`` before it exists, so it takes a second pass over the tiles that sums
``KL(q || m)`` and ``KL(p || m)``. With ``hard_weight`` the pass also tracks the student's
statistics at temperature 1 (the same as ``a``'s when ``T = 1``) and picks each label's
logit, for the cross-entropy term. Residuals: the inputs and a few numbers per row.

Backward: the derived gradients, tile by tile
---------------------------------------------
For each vocabulary chunk and token chunk both tiles are recomputed and
:func:`jaxsoftmax.divergences.logits_gradients` (plus the cross-entropy rule's tile,
:func:`jaxsoftmax.row_terms.logits_gradient`, for the hard term) turns them into the gradient
tiles ``G_s`` and ``G_t``, consumed at once::

    dh_s[T] += G_s W_s[Vc]    dW_s[Vc] += G_s^T h_s[T]    (and the teacher's, with G_t)

An input that is not differentiated (``jax.grad`` of the student only, or a teacher under
``stop_gradient``) is known in the forward (``symbolic_zeros``): its products are skipped, so
a frozen teacher costs two matrix products per tile (its logits, forward and backward), not
four. Ragged chunks and vocabulary shards are handled as in the fused cross-entropy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.checks import arrays
from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.checks.options import (
    check_vocab_mask,
    labels_on_masked_classes_out_of_range,
    reduce_loss,
)
from jaxsoftmax.core import divergences, row_terms
from jaxsoftmax.core.cpu_programs import slice_chunk
from jaxsoftmax.core.varying_axes import summed_like, typed_like_inputs, whole_cotangent
from jaxsoftmax.losses import linear_cross_entropy as lce
from jaxsoftmax.losses.distillation import (
    check_divergence_options,
    check_labels,
    check_labels_needed,
)
from jaxsoftmax.tiles import plan as tile_plan
from jaxsoftmax.tiles.sizes import on_each_platform, tiles_by_platform


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static choices of one call (see :class:`jaxsoftmax.losses.linear_cross_entropy._Plan`):
    the divergence, the hard term's weight, the layout, the tile, and the vocabulary split
    (``options.axis_name``, ``num_classes``: all ``V`` real classes when sharded)."""

    divergence: divergences.DivergenceOptions
    hard_weight: float
    layout: str
    token_chunk: int
    vocab_chunk: int
    options: row_terms.RuleOptions = row_terms.RuleOptions()  # the hard term's rule, axis_name
    num_classes: int | None = None
    tiles: tuple = ()


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Wanted:
    """Which models' gradients the backward computes (static, carried in the residuals)."""

    student: bool
    teacher: bool


def _online(top, total, x):
    """One chunk's update of a row's running maximum and sum of exponentials of ``x``:
    ``(m', s', delta, exp(x - m'), m')`` with ``delta = m - m'`` (0 before any class) and
    ``s' = s exp(delta) + sum_c exp(x_c - m')``."""
    new_top = jnp.maximum(top, jnp.max(x, axis=-1))
    shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # -inf: no class counted yet
    delta = jnp.where(jnp.isfinite(top), top - shift, 0.0)
    exponentials = jnp.exp(x - shift[:, None])
    total = total * jnp.exp(delta) + jnp.sum(exponentials, axis=-1)
    return new_top, total, delta, exponentials, shift


def _across_shards(top, total, axis_name):
    """The vocabulary shards' ``(m, s)`` combined, and each shard's ``delta = m_k - m``."""
    global_top = lax.pmax(top, axis_name)
    shift = jnp.where(jnp.isfinite(global_top), global_top, 0.0)
    delta = jnp.where(jnp.isfinite(top), top - shift, 0.0)
    return global_top, lax.psum(total * jnp.exp(delta), axis_name), delta


def _rescaled_cross(cross, total, delta_own, delta_other):
    """The KL's cross term moved to new maxima: with ``A = sum_c e^(b_c - M_b) ((b_c - M_b)
    - (a_c - M_a))`` (forward KL; reverse KL swaps a and b) and ``delta = M - M'``,
    ``A' = e^(delta_b) (A + (delta_b - delta_a) s_b)``."""
    return jnp.exp(delta_own) * (cross + (delta_own - delta_other) * total)


def _tile_pair(student, teacher, t0, v0, plan, dtype):
    """The student's and the teacher's ``[T, Vc]`` logits of the tile at ``(t0, v0)``."""
    tc, vc = plan.token_chunk, plan.vocab_chunk

    def logits(model):
        bias = None if model.bias is None else lax.dynamic_slice_in_dim(model.bias, v0, vc)
        classifier = tile_plan.classifier_chunk(model.classifier, v0, vc, plan.layout)
        return tile_plan.tile_logits(slice_chunk(model.hidden, t0, tc), classifier, bias,
                                plan.layout, dtype)  # fmt: skip

    return logits(student), logits(teacher)


def _masked(x, fresh):
    return jnp.where(fresh[None, :], x, -jnp.inf)


def _forward(student, teacher, labels, row_mask, vocab_mask, plan: _Plan):
    """Per-row loss ``[N]`` and the per-row residuals: ``(m_a, log s_a, m_b, log s_b,
    KL terms..., [m and log s of z_s for the hard term when T != 1])``."""
    div, hard = plan.divergence, plan.hard_weight > 0
    t = div.temperature
    own_hard_statistics = hard and t != 1.0
    num_tokens = student.hidden.shape[0]
    local, num_classes, offset, rule = tile_plan.vocabulary(student.classifier, plan)
    dtype = _compute_dtype(student, teacher)
    tc, vc = plan.token_chunk, plan.vocab_chunk
    num_tc, token_start = tile_plan.chunk_starts(num_tokens, tc)
    num_vc, vocab_start = tile_plan.chunk_starts(local, vc)
    cross_term = div.divergence != "jsd"  # A, accumulated online
    varying = typed_like_inputs((student, teacher, labels, vocab_mask))

    def fresh_classes(i):
        return tile_plan.visited(vocab_start(i), i, vc, offset, num_classes, plan.options, vocab_mask)

    def token_step(outputs, j):
        t0 = token_start(j)
        labels_t = lax.dynamic_slice_in_dim(labels, t0, tc) if hard else None

        def tile(carry, i):
            top_a, total_a, top_b, total_b, cross, *hard_carry = carry
            v0 = vocab_start(i)
            z_s, z_t = _tile_pair(student, teacher, t0, v0, plan, dtype)
            fresh = fresh_classes(i)
            a, b = _masked(z_s / t, fresh), _masked(z_t / t, fresh)
            old_a, old_b = total_a, total_b
            top_a, total_a, delta_a, e_a, shift_a = _online(top_a, total_a, a)
            top_b, total_b, delta_b, e_b, shift_b = _online(top_b, total_b, b)
            if cross_term:  # relative to the running maxima: no cancellation at large logits
                shifted = (b - shift_b[:, None]) - (a - shift_a[:, None])
                if div.divergence == "forward_kl":
                    cross = _rescaled_cross(cross, old_b, delta_b, delta_a)
                    terms = e_b * shifted
                else:
                    cross = _rescaled_cross(cross, old_a, delta_a, delta_b)
                    terms = -e_a * shifted
                cross = cross + jnp.sum(jnp.where(fresh[None, :], terms, 0.0), axis=-1)
            if hard:
                label_x, *hard_stats = hard_carry
                if own_hard_statistics:
                    hard_stats = list(_online(*hard_stats, _masked(z_s, fresh))[:2])
                index = labels_t - (offset + v0)
                owned = (index >= 0) & (index < vc)
                picked = jnp.take_along_axis(z_s, jnp.clip(index, 0, vc - 1)[:, None], axis=-1)
                hard_carry = [jnp.where(owned, picked[:, 0], label_x), *hard_stats]
            return (top_a, total_a, top_b, total_b, cross, *hard_carry), None

        init = [jnp.full((tc,), -jnp.inf, dtype), jnp.zeros((tc,), dtype)] * 2
        init += [jnp.zeros((tc,), dtype)] * (1 + hard)
        if own_hard_statistics:
            init += [jnp.full((tc,), -jnp.inf, dtype), jnp.zeros((tc,), dtype)]
        stats, _ = lax.scan(tile, varying(tuple(init)), jnp.arange(num_vc, dtype=jnp.int32))
        # Rows of a moved-back last token chunk are recomputed identically: overwriting is exact.
        outputs = tuple(
            lax.dynamic_update_slice_in_dim(o, s, t0, 0) for o, s in zip(outputs, stats)
        )
        return outputs, None

    count = 5 + hard + 2 * own_hard_statistics
    init = varying(tuple(jnp.zeros((num_tokens,), dtype) for _ in range(count)))
    (top_a, total_a, top_b, total_b, cross, *hard_rows), _ = lax.scan(
        token_step, init, jnp.arange(num_tc, dtype=jnp.int32)
    )
    axis_name = plan.options.axis_name
    if axis_name is not None:  # per-row numbers only cross devices
        local_a, local_b = total_a, total_b
        top_a, total_a, delta_a = _across_shards(top_a, total_a, axis_name)
        top_b, total_b, delta_b = _across_shards(top_b, total_b, axis_name)
        if div.divergence == "forward_kl":
            cross = lax.psum(_rescaled_cross(cross, local_b, delta_b, delta_a), axis_name)
        elif div.divergence == "reverse_kl":
            cross = lax.psum(_rescaled_cross(cross, local_a, delta_a, delta_b), axis_name)
        if hard:
            hard_rows[0] = lax.psum(hard_rows[0], axis_name)  # 0 but on the label's shard
            if own_hard_statistics:
                hard_rows[1:] = _across_shards(*hard_rows[1:], axis_name)[:2]
    log_a, log_b = jnp.log(total_a), jnp.log(total_b)
    if div.divergence == "forward_kl":  # KL(q || p) = A / s_b - log s_b + log s_a
        terms = (cross / total_b - log_b + log_a,)
    elif div.divergence == "reverse_kl":
        terms = (cross / total_a - log_a + log_b,)
    else:
        statistics = (top_a, log_a, top_b, log_b)
        terms = _mixture_terms(student, teacher, vocab_mask, statistics, plan, dtype)
    loss = t * t * divergences.row_divergence(terms, div)
    residuals = (top_a, log_a, top_b, log_b, *terms)
    if hard:
        label_x, *hard_stats = hard_rows
        top_h, log_h = (top_a, log_a) if not own_hard_statistics else (hard_stats[0], jnp.log(hard_stats[1]))  # fmt: skip
        if own_hard_statistics:
            residuals += (top_h, log_h)
        bad = row_terms.bad_label_rows(labels, row_mask, num_classes, rule)[:, 0]
        loss = loss + plan.hard_weight * (log_h - (label_x - top_h))
        loss = jnp.where(bad, jnp.nan, loss)
    if row_mask is not None:
        loss = jnp.where(row_mask, loss, 0.0)
    return loss, residuals


def _mixture_terms(student, teacher, vocab_mask, statistics, plan: _Plan, dtype):
    """The JSD's second pass: ``(KL(q || m), KL(p || m))`` per row, ``[N]`` each."""
    top_a, log_a, top_b, log_b = statistics
    num_tokens = student.hidden.shape[0]
    local, num_classes, offset, _ = tile_plan.vocabulary(student.classifier, plan)
    tc, vc, t = plan.token_chunk, plan.vocab_chunk, plan.divergence.temperature
    num_tc, token_start = tile_plan.chunk_starts(num_tokens, tc)
    num_vc, vocab_start = tile_plan.chunk_starts(local, vc)
    varying = typed_like_inputs((student, teacher, vocab_mask, statistics))

    def token_step(outputs, j):
        t0 = token_start(j)
        rows = lambda x: lax.dynamic_slice_in_dim(x, t0, tc)[:, None]

        def tile(sums, i):
            v0 = vocab_start(i)
            fresh = tile_plan.visited(v0, i, vc, offset, num_classes, plan.options, vocab_mask)
            z_s, z_t = _tile_pair(student, teacher, t0, v0, plan, dtype)
            log_p = _masked(z_s / t, fresh) - rows(top_a) - rows(log_a)
            log_q = _masked(z_t / t, fresh) - rows(top_b) - rows(log_b)
            summands = divergences.kl_summands(log_p, log_q, plan.divergence)
            return tuple(s + jnp.sum(x, axis=-1) for s, x in zip(sums, summands)), None

        sums, _ = lax.scan(
            tile, varying((jnp.zeros((tc,), dtype),) * 2), jnp.arange(num_vc, dtype=jnp.int32)
        )
        outputs = tuple(lax.dynamic_update_slice_in_dim(o, s, t0, 0) for o, s in zip(outputs, sums))
        return outputs, None

    init = varying((jnp.zeros((num_tokens,), dtype),) * 2)
    sums, _ = lax.scan(token_step, init, jnp.arange(num_tc, dtype=jnp.int32))
    if plan.options.axis_name is not None:
        sums = lax.psum(sums, plan.options.axis_name)
    return sums


def _backward(student, teacher, labels, row_mask, vocab_mask, residuals, g, wanted, plan):
    """Gradients ``(LinearHead, LinearHead)`` of the student and the teacher (None where not wanted)."""
    div, hard = plan.divergence, plan.hard_weight > 0
    t = div.temperature
    num_tokens = student.hidden.shape[0]
    local, num_classes, offset, rule = tile_plan.vocabulary(student.classifier, plan)
    dtype = _compute_dtype(student, teacher)
    tc, vc = plan.token_chunk, plan.vocab_chunk
    num_tc, token_start = tile_plan.chunk_starts(num_tokens, tc)
    num_vc, vocab_start = tile_plan.chunk_starts(local, vc)
    vocab_axis = 0 if plan.layout == "vd" else 1
    top_a, log_a, top_b, log_b, *rest = residuals
    num_terms = 2 if div.divergence == "jsd" else 1
    terms, hard_stats = rest[:num_terms], rest[num_terms:] or [top_a, log_a]
    participating = None
    if vocab_mask is not None:
        participating = jnp.sum(vocab_mask[:num_classes].astype(dtype))
    models = [m for m, w in ((student, wanted.student), (teacher, wanted.teacher)) if w]
    varying = typed_like_inputs((student, teacher, labels, row_mask, vocab_mask, residuals, g))

    def vocab_step(carry, i):
        v0 = vocab_start(i)
        fresh = tile_plan.visited(v0, i, vc, offset, num_classes, plan.options, vocab_mask)
        block = row_terms.ClassBlock(offset + v0, num_classes, None, participating)

        def token_step(inner, j):
            t0 = token_start(j)
            rows = lambda x: None if x is None else lax.dynamic_slice_in_dim(x, t0, tc)
            # Rows of a moved-back last chunk that an earlier chunk already took get g = 0.
            fresh_rows = (t0 + lax.broadcasted_iota(jnp.int32, (tc,), 0)) >= j * tc
            g_t = jnp.where(fresh_rows, rows(g), 0.0)
            if row_mask is not None:
                g_t = jnp.where(rows(row_mask), g_t, 0.0)
            z_s, z_t = _tile_pair(student, teacher, t0, v0, plan, dtype)
            log_p = _masked(z_s / t, fresh) - rows(top_a)[:, None] - rows(log_a)[:, None]
            log_q = _masked(z_t / t, fresh) - rows(top_b)[:, None] - rows(log_b)[:, None]
            terms_t = [rows(term)[:, None] for term in terms]
            grads = divergences.logits_gradients(
                log_p, log_q, terms_t, div, wanted.student, wanted.teacher
            )
            grads = [None if x is None else x * g_t[:, None] for x in grads]
            if hard and wanted.student:  # + h (softmax(z_s) - onehot(y)) g, the core's rule
                statistics = tuple(rows(x)[:, None] for x in hard_stats)
                hard_g = plan.hard_weight * g_t
                grads[0] = grads[0] + row_terms.logits_gradient(
                    z_s, rows(labels), None, None, rows(row_mask), statistics, hard_g, rule, block
                )
            grads = [jnp.where(fresh[None, :], x, 0.0) for x in grads if x is not None]
            hidden_tiles = [slice_chunk(m.hidden, t0, tc) for m in models]
            return [
                _products(acc, grad, h_t, m, v0, t0, plan)
                for acc, grad, h_t, m in zip(inner, grads, hidden_tiles, models)
            ], None

        inner = []
        for model, (d_hidden, _, _) in zip(models, carry):
            width = model.hidden.shape[1]
            shape = (vc, width) if plan.layout == "vd" else (width, vc)
            acc = row_terms.compute_dtype(model.classifier.dtype)
            bias = None if model.bias is None else jnp.zeros((vc,), acc)
            inner.append((d_hidden, *varying((jnp.zeros(shape, acc), bias))))
        run = lambda inner: lax.scan(token_step, inner, jnp.arange(num_tc, dtype=jnp.int32))[0]
        if vocab_mask is None:
            inner = run(inner)
        else:  # a chunk of only masked classes adds nothing: skipped
            inner = lax.cond(jnp.any(fresh), run, lambda x: x, inner)
        out = []
        # Classes already written by an earlier chunk got exactly 0 here: adding is exact.
        for model, (_, d_classifier, d_bias), (d_hidden, d_classifier_c, d_bias_c) in zip(
            models, carry, inner
        ):
            d_classifier = lax.dynamic_update_slice_in_dim(
                d_classifier,
                tile_plan.classifier_chunk(d_classifier, v0, vc, plan.layout)
                + d_classifier_c.astype(model.classifier.dtype),
                v0,
                vocab_axis,
            )
            if d_bias is not None:
                d_bias = lax.dynamic_update_slice_in_dim(
                    d_bias,
                    lax.dynamic_slice_in_dim(d_bias, v0, vc) + d_bias_c.astype(d_bias.dtype),
                    v0,
                    0,
                )
            out.append((d_hidden, d_classifier, d_bias))
        return out, None

    init = varying(
        [
            (
                jnp.zeros(m.hidden.shape, row_terms.compute_dtype(m.hidden.dtype)),
                jnp.zeros_like(m.classifier),
                None if m.bias is None else jnp.zeros_like(m.bias),
            )
            for m in models
        ]
    )
    found, _ = lax.scan(vocab_step, init, jnp.arange(num_vc, dtype=jnp.int32))
    found = iter(found)
    gradients = []
    for model, w in ((student, wanted.student), (teacher, wanted.teacher)):
        if not w:
            gradients.append(None)
            continue
        d_hidden, d_classifier, d_bias = next(found)
        gradients.append(LinearHead(d_hidden.astype(model.hidden.dtype), d_classifier, d_bias))
    return tuple(gradients)


def _products(inner, grad, hidden_t, model, v0, t0, plan):
    """One model's ``dh[T] += G W[Vc]``, ``dW[Vc] += G^T h[T]``, ``db[Vc] += sum G``."""
    d_hidden, d_classifier_c, d_bias_c = inner
    vocab_axis = 0 if plan.layout == "vd" else 1
    classifier_c = tile_plan.classifier_chunk(model.classifier, v0, plan.vocab_chunk, plan.layout)
    grad_in = grad.astype(model.hidden.dtype)  # the products in the inputs' dtype
    d_hidden_t = lax.dot_general(
        grad_in, classifier_c, (((1,), (vocab_axis,)), ((), ())),
        preferred_element_type=d_hidden.dtype,
    )  # fmt: skip
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


def _compute_dtype(student: LinearHead, teacher: LinearHead):
    return divergences.wider_compute_dtype(student.hidden.dtype, teacher.hidden.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def distillation_rows(student, teacher, labels, row_mask, vocab_mask, plan: _Plan):
    """Per-row loss ``[N]`` of the two models' last layers, by the derived rule."""
    return on_each_platform(_forward, plan, student, teacher, labels, row_mask, vocab_mask)[0]


def _rows_fwd(student, teacher, labels, row_mask, vocab_mask, plan):
    perturbed = lambda model: any(x.perturbed for x in jax.tree.leaves(model, is_leaf=_is_primal))  # fmt: skip
    wanted = _Wanted(perturbed(student), perturbed(teacher))
    student, teacher, labels, row_mask, vocab_mask = jax.tree.map(
        lambda x: x.value, (student, teacher, labels, row_mask, vocab_mask), is_leaf=_is_primal
    )
    args = (student, teacher, labels, row_mask, vocab_mask)
    loss, residuals = on_each_platform(_forward, plan, *args)
    return loss, (*args, residuals, wanted)


def _is_primal(x):
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _rows_bwd(plan, residuals, g):
    student, teacher, labels, row_mask, vocab_mask, statistics, wanted = residuals
    g = whole_cotangent(g, student.classifier, plan.options.axis_name)
    args = (student, teacher, labels, row_mask, vocab_mask, statistics, g, wanted)
    gradients = on_each_platform(_backward_bound, plan, *args)
    out = []
    for model, gradient in zip((student, teacher), gradients):
        if gradient is None:
            out.append(None)
        else:
            out.append(LinearHead(*(summed_like(d, x) for d, x in zip(gradient, model))))
    return (*out, None, None, None)


def _backward_bound(student, teacher, labels, row_mask, vocab_mask, statistics, g, wanted,
                    plan):  # fmt: skip
    return _backward(student, teacher, labels, row_mask, vocab_mask, statistics, g, wanted, plan)


distillation_rows.defvjp(_rows_fwd, _rows_bwd, symbolic_zeros=True)


def linear_distillation_loss(
    student_hidden: jax.typing.ArrayLike,
    student_classifier: jax.typing.ArrayLike,
    teacher_hidden: jax.typing.ArrayLike,
    teacher_classifier: jax.typing.ArrayLike,
    *,
    labels: jax.typing.ArrayLike | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    hard_weight: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    vocab_mask: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    student_bias: jax.typing.ArrayLike | None = None,
    teacher_bias: jax.typing.ArrayLike | None = None,
    classifier_layout: str = "vd",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    checked: bool = False,
) -> jax.Array:
    r""":func:`~jaxsoftmax.distillation_loss` of two models' logits, never building them.

    Equal, in value and in every gradient, to::

        distillation_loss(student_hidden @ student_classifier.T + student_bias,
                          teacher_hidden @ teacher_classifier.T + teacher_bias, ...)

    while holding one ``[token_chunk, vocab_chunk]`` tile of each model's logits at a time:
    for a language model's vocabulary neither ``[N, V]`` array exists, in the forward or the
    backward (the two [8192, 256000] float32 logits alone would be 16.8 GB). The divergences,
    the temperature's ``T^2``, the hard term and the options are
    :func:`~jaxsoftmax.distillation_loss`'s; the rule and how the tiles are visited are in
    :mod:`jaxsoftmax.losses.linear_distillation` and docs/distillation.md.

    The teacher gets its true gradients too. A teacher that is not differentiated
    (``jax.grad`` with respect to the student only, or ``jax.lax.stop_gradient``) costs no
    gradient products: that is known when the loss is differentiated.

    Args:
      student_hidden: float ``[..., d_s]``, the student's last hidden states.
      student_classifier: float ``[V, d_s]`` (``[d_s, V]`` with ``classifier_layout="dv"``),
        ``student_hidden``'s dtype.
      teacher_hidden: float ``[..., d_t]``: the same tokens (leading shape), any width.
      teacher_classifier: float ``[V, d_t]`` (or ``[d_t, V]``): the same vocabulary ``V``.
      labels, divergence, temperature, beta, hard_weight, where, ignore_index, vocab_mask,
        reduction, checked: as in :func:`~jaxsoftmax.distillation_loss` (``where`` and
        ``labels`` with the tokens' shape).
      student_bias, teacher_bias: float ``[V]`` or None.
      classifier_layout: ``"vd"`` or ``"dv"``, for both classifiers.
      token_chunk, vocab_chunk: the tile; None chooses each backend's (as
        :func:`~jaxsoftmax.linear_cross_entropy`).

    Returns:
      The reduced loss, or one per token with ``reduction="none"``, in the student's dtype.
      Reverse mode only (a ``jax.custom_vjp``); for forward mode use
      :func:`~jaxsoftmax.distillation_loss` on the logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsoftmax import distillation_loss
      >>> keys = jax.random.split(jax.random.key(0), 4)
      >>> h_s, W_s = jax.random.normal(keys[0], (6, 4)), jax.random.normal(keys[1], (10, 4))
      >>> h_t, W_t = jax.random.normal(keys[2], (6, 8)), jax.random.normal(keys[3], (10, 8))
      >>> fused = linear_distillation_loss(h_s, W_s, h_t, W_t, temperature=2.0,
      ...                                  token_chunk=4, vocab_chunk=3)
      >>> unfused = distillation_loss(h_s @ W_s.T, h_t @ W_t.T, temperature=2.0)
      >>> print(bool(jnp.allclose(fused, unfused, atol=1e-5)))
      True
    """
    call = validated(
        student_hidden,
        student_classifier,
        teacher_hidden,
        teacher_classifier,
        labels=labels,
        divergence=divergence,
        temperature=temperature,
        beta=beta,
        hard_weight=hard_weight,
        where=where,
        ignore_index=ignore_index,
        vocab_mask=vocab_mask,
        reduction=reduction,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        classifier_layout=classifier_layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        checked=checked,
    )
    plan = make_plan(call, call.student.hidden.shape[0], call.num_classes)
    loss, weight = rows_and_weights(call, plan)
    out = reduce_loss(loss.reshape(call.batch), weight.reshape(call.batch), call.reduction)
    return out.astype(call.student.hidden.dtype)


class Call(NamedTuple):
    """A call's arguments, checked: tokens flattened, ``where`` and ``ignore_index`` merged."""

    student: LinearHead  # hidden [N, d_s]
    teacher: LinearHead  # hidden [N, d_t]
    labels: jax.Array | None  # [N]
    row_mask: jax.Array | None  # [N]
    vocab_mask: jax.Array | None  # [V]
    batch: tuple  # the tokens' shape
    num_classes: int
    reduction: str
    divergence: divergences.DivergenceOptions
    hard_weight: float
    layout: str
    token_chunk: int | None
    vocab_chunk: int | None


def make_plan(call: Call, num_tokens: int, num_local: int, axis_name=None) -> _Plan:
    """The plan for ``num_tokens`` rows against ``num_local`` classes (one shard's when the
    vocabulary is split over ``axis_name``), with the call's chunks or each backend's."""
    tiles = tiles_by_platform(num_tokens, num_local, call.token_chunk, call.vocab_chunk)
    _, token_chunk, vocab_chunk = next(t for t in tiles if t[0] == "default")
    return _Plan(
        divergence=call.divergence,
        hard_weight=call.hard_weight,
        layout=call.layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        options=row_terms.RuleOptions(axis_name=axis_name),
        num_classes=None if axis_name is None else call.num_classes,
        tiles=tiles,
    )


def rows_and_weights(call: Call, plan: _Plan):
    """Per-token losses ``[N]`` and their weights in a mean (1, or 0 where not counted)."""
    num_tokens = call.student.hidden.shape[0]
    dtype = _compute_dtype(call.student, call.teacher)
    if num_tokens == 0:
        loss = jnp.zeros((0,), dtype)
    else:
        loss = distillation_rows(
            call.student, call.teacher, call.labels, call.row_mask, call.vocab_mask, plan
        )
    weight = jnp.ones((num_tokens,), dtype)
    if call.row_mask is not None:
        weight = jnp.where(call.row_mask, weight, 0.0)
    return loss, weight


def validated(
    student_hidden, student_classifier, teacher_hidden, teacher_classifier, *, labels,
    divergence, temperature, beta, hard_weight, where, ignore_index, vocab_mask, reduction,
    student_bias, teacher_bias, classifier_layout, token_chunk, vocab_chunk, checked=False,
) -> Call:  # fmt: skip
    """Checks :func:`linear_distillation_loss`'s arguments (see there), flattens the tokens."""
    if classifier_layout not in lce.LAYOUTS:
        raise ValueError(
            f"classifier_layout must be one of {lce.LAYOUTS} ([V, d] or [d, V]); got "
            f"{classifier_layout!r}."
        )
    student = _check_model("student", student_hidden, student_classifier, student_bias,
                           classifier_layout)  # fmt: skip
    teacher = _check_model("teacher", teacher_hidden, teacher_classifier, teacher_bias,
                           classifier_layout)  # fmt: skip
    vocab_axis = 0 if classifier_layout == "vd" else 1
    num_classes = student.classifier.shape[vocab_axis]
    if teacher.classifier.shape[vocab_axis] != num_classes:
        raise ValueError(
            f"teacher_classifier must have the student's vocabulary, V = {num_classes} "
            f"(student_classifier's {arrays.describe(student.classifier)}); got "
            f"{arrays.describe(teacher.classifier)}. Distillation compares the two models' "
            "distributions class by class."
        )
    batch = student.hidden.shape[:-1]
    if teacher.hidden.shape[:-1] != batch:
        raise ValueError(
            f"teacher_hidden must hold the student's tokens, shape {batch} + (d_t,); got "
            f"{arrays.describe(teacher.hidden)}. Nothing is broadcast."
        )
    for name, model in (("student", student), ("teacher", teacher)):
        bias = model.bias
        if bias is not None and tuple(bias.shape) != (num_classes,):
            raise ValueError(
                f"{name}_bias must have one entry per class, shape ({num_classes},); got "
                f"{arrays.describe(bias)}."
            )
    options = check_divergence_options(divergence, temperature, beta)
    hard_weight = arrays.check_number(hard_weight, "hard_weight", low=0.0)
    reduction = arrays.check_reduction(reduction)
    ignore_index = arrays.check_ignore_index(ignore_index, True)
    check_labels_needed(labels, hard_weight, ignore_index)
    num_tokens = math.prod(batch)
    if labels is not None:
        labels = arrays.as_array(labels, "labels")
        if not jnp.issubdtype(labels.dtype, jnp.integer) or tuple(labels.shape) != batch:
            raise ValueError(
                f"labels must be integer class indices of the tokens' shape {batch}; got "
                f"{arrays.describe(labels)}. Nothing is broadcast."
            )
        labels = labels.reshape(num_tokens)
        if labels.dtype.itemsize > 4:  # int64 under x64: int32, out-of-range labels stay out
            labels = jnp.clip(labels, -(2**31), 2**31 - 1).astype(jnp.int32)
    row_mask = None
    if where is not None:
        where = arrays.as_array(where, "where")
        if where.dtype != jnp.bool_ or tuple(where.shape) != batch:
            raise ValueError(
                f"where must be a boolean array of one entry per token, shape {batch}; got "
                f"{arrays.describe(where)}. (Classes to leave out go in vocab_mask=.)"
            )
        row_mask = where.reshape(num_tokens)
    if ignore_index is not None:
        kept = labels != ignore_index
        row_mask = kept if row_mask is None else row_mask & kept
    vocab_mask = check_vocab_mask(vocab_mask, num_classes)
    if arrays.check_flag(checked, "checked") and hard_weight:
        check_labels(labels, num_classes, row_mask, ignore_index, vocab_mask)
    if vocab_mask is not None and labels is not None:  # a label on a masked class is bad
        labels = labels_on_masked_classes_out_of_range(labels, vocab_mask, ignore_index)
    if not hard_weight:
        labels = None  # only the hard term reads them past this point
    flat = lambda m: m._replace(hidden=m.hidden.reshape(num_tokens, m.hidden.shape[-1]))
    return Call(
        student=flat(student),
        teacher=flat(teacher),
        labels=labels,
        row_mask=row_mask,
        vocab_mask=vocab_mask,
        batch=batch,
        num_classes=num_classes,
        reduction=reduction,
        divergence=options,
        hard_weight=hard_weight,
        layout=classifier_layout,
        token_chunk=lce._check_chunk(token_chunk, "token_chunk"),
        vocab_chunk=lce._check_chunk(vocab_chunk, "vocab_chunk"),
    )


def _check_model(name: str, hidden, classifier, bias, layout: str) -> LinearHead:
    """One model's ``(hidden, classifier, bias)``: float arrays of matching widths."""
    hidden = lce._check_float(hidden, f"{name}_hidden")
    classifier = lce._check_float(classifier, f"{name}_classifier")
    if hidden.ndim < 1:
        raise ValueError(f"{name}_hidden must have a feature axis, shape [..., d]; got a scalar.")
    width = hidden.shape[-1]
    feature_axis = 1 if layout == "vd" else 0
    if classifier.ndim != 2 or classifier.shape[feature_axis] != width:
        expected = "[V, d]" if layout == "vd" else "[d, V]"
        raise ValueError(
            f"{name}_classifier must have shape {expected} with d = {width} ({name}_hidden's "
            f"last axis) for classifier_layout={layout!r}; got {arrays.describe(classifier)}."
        )
    if classifier.dtype != hidden.dtype:
        raise TypeError(
            f"{name}_classifier must have {name}_hidden's dtype "
            f"{jnp.dtype(hidden.dtype).name}; got {arrays.describe(classifier)}. Cast one of them."
        )
    if bias is not None:
        bias = lce._check_float(bias, f"{name}_bias")
    return LinearHead(hidden, classifier, bias)

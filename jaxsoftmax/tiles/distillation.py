"""The fused distillation's rule: both classifiers and the distillation loss, tile by tile.

Distillation builds two ``[N, V]`` logits, the student's ``z_s = h_s W_s^T + b_s`` and the
teacher's ``z_t = h_t W_t^T + b_t``. :func:`distillation_rows` computes the same per-row loss
and gradients as the rule of :mod:`jaxsoftmax.core.divergences` on them (``a = z_s / T``,
``b = z_t / T``, ``p = softmax(a)``, ``q = softmax(b)``, plus the cross-entropy term with
``hard_weight``) while holding one ``[T, Vc]`` tile of each at a time
(:mod:`jaxsoftmax.tiles.distillation_plan`):

* forward (:mod:`jaxsoftmax.tiles.distillation_forward`): online statistics of both
  softmaxes and the KL's cross term, a second pass for the JSD; residuals: the inputs and a
  few numbers per row;
* backward (:mod:`jaxsoftmax.tiles.distillation_backward`): both tiles recomputed, turned
  into the derived gradient tiles and consumed at once by the matrix products.

It is a ``jax.custom_vjp`` with ``symbolic_zeros``: an input that is not differentiated
(``jax.grad`` of the student only, or a teacher under ``stop_gradient``) is known in the
forward, and its gradient products are skipped. Each backend's tile is chosen when the
program is lowered (:func:`jaxsoftmax.tiles.sizes.on_each_platform`). Reverse mode only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsoftmax.checks.distillation_call import DistillationCall
from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.core import row_terms
from jaxsoftmax.core.varying_axes import summed_like, whole_cotangent
from jaxsoftmax.tiles.distillation_backward import backward
from jaxsoftmax.tiles.distillation_forward import forward
from jaxsoftmax.tiles.distillation_plan import DistillationPlan, Wanted, compute_dtype
from jaxsoftmax.tiles.sizes import chosen_tiles, on_each_platform


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def distillation_rows(student, teacher, labels, row_mask, vocab_mask, plan: DistillationPlan):
    """Per-row loss ``[N]`` of the two models' last layers (:class:`LinearHead` each, tokens
    ``[N, d]``), by the derived rule; ``labels`` and ``row_mask`` ``[N]``, ``vocab_mask``
    ``[V]``, each None when absent."""
    return on_each_platform(forward, plan, student, teacher, labels, row_mask, vocab_mask)[0]


def _rows_fwd(student, teacher, labels, row_mask, vocab_mask, plan):
    perturbed = lambda model: any(x.perturbed for x in jax.tree.leaves(model, is_leaf=_is_primal))  # fmt: skip
    wanted = Wanted(perturbed(student), perturbed(teacher))
    student, teacher, labels, row_mask, vocab_mask = jax.tree.map(
        lambda x: x.value, (student, teacher, labels, row_mask, vocab_mask), is_leaf=_is_primal
    )
    args = (student, teacher, labels, row_mask, vocab_mask)
    loss, residuals = on_each_platform(forward, plan, *args)
    return loss, (*args, residuals, wanted)


def _is_primal(x):
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _rows_bwd(plan, residuals, g):
    student, teacher, labels, row_mask, vocab_mask, statistics, wanted = residuals
    g = whole_cotangent(g, student.classifier, plan.options.axis_name)
    args = (student, teacher, labels, row_mask, vocab_mask, statistics, g, wanted)
    gradients = on_each_platform(backward, plan, *args)
    out = []
    for model, gradient in zip((student, teacher), gradients):
        if gradient is None:
            out.append(None)
        else:
            out.append(LinearHead(*(summed_like(d, x) for d, x in zip(gradient, model))))
    return (*out, None, None, None)


distillation_rows.defvjp(_rows_fwd, _rows_bwd, symbolic_zeros=True)


def make_plan(call: DistillationCall, student: LinearHead, teacher: LinearHead, num_local: int,
              axis_name=None) -> DistillationPlan:  # fmt: skip
    """The plan for the two models' ``N`` rows against ``num_local`` classes (one shard's when
    the vocabulary is split over ``axis_name``), with the call's chunks or each backend's."""
    num_tokens = student.hidden.shape[0]
    widths = (student.hidden.shape[-1], teacher.hidden.shape[-1])
    by_platform, token_chunk, vocab_chunk = chosen_tiles(num_tokens, num_local, call.tiles, widths)
    return DistillationPlan(
        divergence=call.divergence,
        hard_weight=call.hard_weight,
        layout=call.tiles.layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        options=row_terms.RuleOptions(axis_name=axis_name),
        num_classes=None if axis_name is None else call.num_classes,
        tiles=by_platform,
    )


def rows_and_weights(student: LinearHead, teacher: LinearHead, labels, row_mask, vocab_mask,
                     plan: DistillationPlan):  # fmt: skip
    """Per-token losses ``[N]`` and their weights in a mean (1, or 0 where not counted)."""
    num_tokens = student.hidden.shape[0]
    dtype = compute_dtype(student, teacher)
    if num_tokens == 0:
        loss = jnp.zeros((0,), dtype)
    else:
        loss = distillation_rows(student, teacher, labels, row_mask, vocab_mask, plan)
    weight = jnp.ones((num_tokens,), dtype)
    if row_mask is not None:
        weight = jnp.where(row_mask, weight, 0.0)
    return loss, weight

"""The fused cross-entropy's rule: per-row losses of ``h W^T + b`` without the logits.

:func:`linear_rows` is a ``jax.custom_vjp`` whose forward is the online log-sum-exp of
:mod:`jaxsoftmax.tiles.cross_entropy_forward` and whose backward is the core's rule applied
tile by tile (:mod:`jaxsoftmax.tiles.cross_entropy_backward`); its residuals are the inputs,
two numbers per row and whether the classifier or bias is differentiated (a frozen
classifier's backward computes ``dh`` alone). The entry points the public losses call:

* :func:`make_plan`: a checked call's :class:`~jaxsoftmax.tiles.plan.TilePlan`, with each
  backend's tile;
* :func:`rows_and_weights`: per-row losses and their weights in a mean (and the
  :class:`~jaxsoftmax.LossAux` with ``return_aux``), for a whole vocabulary or, inside
  ``shard_map``, one shard of it;
* :func:`choose_method` and :func:`reduced_by_forward_gradient`: ``method="forward"``
  (:mod:`jaxsoftmax.tiles.forward_gradient`), three matrix products instead of four.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jaxsoftmax.checks.linear_call import LinearCall
from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.core import companion_terms, row_terms
from jaxsoftmax.core.cpu_programs import per_platforms
from jaxsoftmax.core.varying_axes import summed_like, whole_cotangent
from jaxsoftmax.tiles import forward_gradient
from jaxsoftmax.tiles import plan as tile_plan
from jaxsoftmax.tiles.cross_entropy_backward import backward
from jaxsoftmax.tiles.cross_entropy_forward import forward
from jaxsoftmax.tiles.plan import TilePlan
from jaxsoftmax.tiles.sizes import chosen_tiles, on_each_platform


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def linear_rows(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask,
                plan: TilePlan):  # fmt: skip
    """Per-row loss ``[N]`` of ``hidden [N, d]`` against the classifier, by the rule; with
    ``plan.companions``, ``(loss, lse, entropy, correct)``."""
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
    return online_forward(*args, plan)[0]


def online_forward(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, plan):
    """The online forward; residuals: the inputs and ``(m, log s[, H])`` per row."""
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
    loss, statistics, *companions = on_each_platform(forward, plan, *args)
    out = loss
    if plan.companions:  # (loss, lse, entropy, correct); the entropy is a residual too
        (lse, entropy, correct), statistics = companions[0], (*statistics, companions[0][1])
        out = (loss, lse, entropy, correct)
    return out, (*args, statistics)


def linear_rows_fwd(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, plan):
    """:func:`online_forward`, told which inputs are differentiated (``custom_vjp``'s
    ``symbolic_zeros``: each array comes as a ``CustomVJPPrimal``). When neither the
    classifier nor the bias is, the residuals say so and the backward computes ``dh`` alone,
    in one token-outer pass (:func:`jaxsoftmax.tiles.cross_entropy_backward.backward`)."""
    primals = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
    is_primal = lambda x: isinstance(x, CustomVJPPrimal)
    values = jax.tree.map(lambda p: p.value, primals, is_leaf=is_primal)
    out, residuals = online_forward(*values, plan)
    head = [p.perturbed for p in jax.tree.leaves((classifier, bias), is_leaf=is_primal)]
    return out, (*residuals, _present(any(head)))


def _present(flag: bool):
    """A static flag carried through the residuals as their structure: ``()`` or None."""
    return () if flag else None


def _zeros_if_symbolic(g):
    """A cotangent that ``custom_vjp`` passes as a :class:`SymbolicZero` (an output nothing
    reads, under ``symbolic_zeros``), as zeros."""
    return jnp.zeros(g.shape, g.dtype) if isinstance(g, SymbolicZero) else g


def linear_rows_bwd(plan, residuals, g):
    """The rule tile by tile; the class weights get a zero gradient (a constant)."""
    *residuals, head_wanted = residuals
    hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, statistics = residuals
    axis_name = plan.options.axis_name
    if plan.companions:
        g = tuple(whole_cotangent(_zeros_if_symbolic(c), classifier, axis_name) for c in g[:3])
    else:
        g = whole_cotangent(_zeros_if_symbolic(g), classifier, axis_name)
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, statistics, g)
    rule = functools.partial(backward, head_wanted=head_wanted is not None)
    d_hidden, d_classifier, d_bias = on_each_platform(rule, plan, *args)
    d_hidden, d_classifier, d_bias = (
        summed_like(d, x)
        for d, x in ((d_hidden, hidden), (d_classifier, classifier), (d_bias, bias))
    )
    d_weights = None if class_weights is None else jnp.zeros_like(class_weights)
    return d_hidden, d_classifier, d_bias, None, d_weights, None, None


linear_rows.defvjp(linear_rows_fwd, linear_rows_bwd, symbolic_zeros=True)


def make_plan(call: LinearCall, hidden_shape: tuple[int, int], num_local: int, axis_name=None,
              companions=False) -> TilePlan:  # fmt: skip
    """The plan for ``hidden_shape`` ``(N, d)`` against ``num_local`` classes (one shard's,
    when the vocabulary is split over ``axis_name``), with the call's chunks or each
    backend's."""
    num_tokens, width = hidden_shape
    by_platform, token_chunk, vocab_chunk = chosen_tiles(
        num_tokens, num_local, call.tiles, (width,)
    )
    return TilePlan(
        options=call.options.rule(axis_name),
        layout=call.tiles.layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        accumulation_dtype=call.tiles.accumulation_dtype,
        num_classes=None if axis_name is None else call.num_classes,
        tiles=by_platform,
        companions=companions,
        gradient_filter=call.tiles.gradient_filter,
    )


def rows_and_weights(head: LinearHead, labels, class_weights, row_mask, vocab_mask,
                     plan: TilePlan):  # fmt: skip
    """Per-row losses ``[N]`` and mean weights ``[N]`` (``w[label]`` or 1; 0 where masked);
    with ``plan.companions`` also the :class:`~jaxsoftmax.LossAux`.

    With ``plan.options.axis_name`` (inside ``shard_map``): the head's classifier and bias
    are this shard's classes, ``class_weights`` all ``V`` of them (padded like the
    classifier).
    """
    num_tokens = head.hidden.shape[0]
    _, num_classes, _, rule = tile_plan.vocabulary(head.classifier, plan)
    dtype = row_terms.compute_dtype(head.hidden.dtype)
    if num_tokens == 0:
        empty = jnp.zeros((0,), dtype)
        out = (empty, empty, empty, empty.astype(bool)) if plan.companions else empty
    else:
        out = linear_rows(*head, labels, class_weights, row_mask, vocab_mask, plan)
    weight = mean_weights(labels, class_weights, row_mask, num_classes, dtype, rule)
    if not plan.companions:
        return out, weight
    loss, lse, entropy, correct = out
    return loss, weight, loss_aux(lse, entropy, correct, labels, class_weights, num_classes, rule)


def loss_aux(lse, entropy, correct, labels, class_weights, num_classes, rule):
    """The :class:`~jaxsoftmax.LossAux` of each row, its z-loss weighted by ``w[label]``."""
    r = row_terms.row_weight(labels, class_weights, num_classes, lse.dtype, rule)
    r = jnp.broadcast_to(r, (lse.shape[0], 1))[:, 0]
    return companion_terms.loss_aux(lse, entropy, correct, r, rule.z_loss)


def mean_weights(labels, class_weights, row_mask, num_classes: int, dtype, options):
    """Each row's weight in the mean, ``[N]``: ``w[label]`` (1 without class weights), 0 where
    ``row_mask`` drops the row."""
    weight = row_terms.row_weight(labels, class_weights, num_classes, dtype, options)
    weight = jnp.broadcast_to(weight, (labels.shape[0], 1))[:, 0]
    if row_mask is not None:
        weight = jnp.where(row_mask, weight, 0.0)
    return weight


def choose_method(call: LinearCall, method: str) -> str:
    """The method ``"auto"`` stands for with these arguments (see
    :func:`~jaxsoftmax.linear_cross_entropy`); other methods are returned as they are."""
    if method != "auto":
        return method
    width = call.head.hidden.shape[-1]
    return forward_gradient.auto_method(call.num_classes, width, call.options.reduction)


def forward_on_the_cpu(forward_method, recompute_method):
    """``forward_method()`` on the CPU, ``recompute_method()`` elsewhere, chosen when the
    program is lowered: ``method="auto"`` for a small classifier.

    On a CPU the matrix products dominate and ``method="forward"``'s three beat the default's
    four (docs/performance.md); on an accelerator the fused loss is for memory, and the
    forward method's float32 ``[V, d]`` gradient, held from the forward to the backward, is
    the largest buffer of the step (TPU v5e at the benchmark's shape, bf16: 64.5 MiB against
    0.6; tests/tpu/check_compiled_memory.py). Both return the same types.
    """
    return per_platforms(recompute_method, cpu=forward_method)()


def loss_rows(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask,
              plan: TilePlan):  # fmt: skip
    """Per-row losses by the online forward, nothing differentiated."""
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
    return on_each_platform(forward, plan, *args)[0]


def recompute_backward(*args, plan: TilePlan):
    """The default path's backward, tile by tile (``method="forward"`` uses it for the
    companions' cotangents, which arrive only in the backward)."""
    return on_each_platform(backward, plan, *args)


def reduced_by_forward_gradient(call: LinearCall, plan: TilePlan):
    """The reduced loss, its gradients computed in the forward (``method="forward"``); with
    ``plan.companions``, ``(loss, lse, entropy, correct)``."""
    num_tokens = call.head.hidden.shape[0]
    rows = call.tiles.token_chunk or forward_gradient.default_block(num_tokens, call.num_classes)
    block_plan = dataclasses.replace(plan, token_chunk=min(rows, num_tokens))
    dtype = row_terms.compute_dtype(call.head.hidden.dtype)
    weight = mean_weights(
        call.labels, call.class_weights, call.row_mask, call.num_classes, dtype, plan.options
    )
    return forward_gradient.reduced_loss(
        *call.head, call.labels, call.class_weights, call.row_mask, call.vocab_mask, weight,
        call.options.reduction, block_plan, functools.partial(loss_rows, plan=plan),
        functools.partial(recompute_backward, plan=plan) if plan.companions else None,
    )  # fmt: skip

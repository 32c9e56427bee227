"""The derived rule: softmax cross-entropy forward and its hand-written backward.

The one place where every public loss is defined and differentiated, for class-last logits
(the public functions move axes and validate first). Plain JAX, the program GPUs and TPUs
compile; XLA's CPU backend gets equal programs from :mod:`jaxsoftmax.core.cpu_programs`. The
fused and sharded losses build on :func:`capped`, :func:`row_statistics`,
:func:`label_cross_entropy` and :func:`row_loss` (the forward from per-row numbers), and
:func:`logits_gradient` with a :class:`ClassBlock` (one tile of the backward).

The rule
--------
For one row of logits ``z`` (``C`` classes), ``s = softmax(z)`` and a target vector ``q``
(a distribution, or a weighted / smoothed one that need not sum to one)::

    loss = -sum_c q_c log s_c = sum_c q_c (lse(z) - z_c)        lse(z) = log sum_k exp z_k

The softmax Jacobian is ``ds_i/dz_j = s_i (delta_ij - s_j)``, so the chain rule through the
log gives ``dloss/dz_j = -sum_i q_i (delta_ij - s_j) = s_j sum_i q_i - q_j``: for targets
that sum to one, ``s - q`` (the derivation in docs/derivation.md). With an upstream
cotangent ``g`` (a mean over N examples passes ``g = 1/N``) every row is multiplied by
``g``. Each option only changes ``q``, adds a term, or multiplies by a derivative:

* class weights ``w`` and label smoothing ``eps`` over ``K`` participating classes:
  ``q_c = w_c ((1 - eps) y_c + eps / K)`` (PyTorch's definition, with ``y`` one-hot for
  integer labels),
* z-loss (PaLM) adds ``beta * r * lse^2`` per row (``r`` is the row's weight, ``w[label]``
  for integer labels, else 1), whose gradient is ``2 beta r lse * s``,
* a logit soft cap (Gemma 2) feeds ``x = cap * tanh(z / cap)`` to the softmax; its
  derivative ``1 - tanh(z / cap)^2 = 1 - (x / cap)^2`` multiplies the gradient elementwise.

Together, the backward expression (:func:`gradient_expression`) is::

    dloss/dz = ((sum_c q_c + 2 beta r lse) * s - q) * g * (1 - tanh(z / cap)^2)

Residuals: the logits (alive anyway in a training step) and two numbers per row, the row
maximum ``m`` and ``log_sum = log sum_k exp(x_k - m)``, kept apart so the softmax stays exact
at huge logits (at ``|z| ~ 1e30`` in float32 ``lse`` rounds to ``m``). The backward computes
``s = exp(x - m) * exp(-log_sum)``, the forward's own exponential, computed once per logit
in a program that holds both (``jit`` of ``value_and_grad``). bf16 and f16 are computed in
float32; float64 stays float64. With ``axis_name`` the class axis is split over that mapped
axis and every sum or maximum over it ends in a ``psum`` / ``pmax`` of per-row values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.core import cpu_programs as fast
from jaxsoftmax.core import row_terms
from jaxsoftmax.core.row_terms import RuleOptions, is_indices
from jaxsoftmax.core.varying_axes import whole_cotangent


# The custom rule. Every platform gets the plain functions above but XLA's CPU backend,
# which gets the equal programs of `_cpu_fast_paths` when the program is lowered for it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def softmax_cross_entropy_rows(logits, targets, class_mask, class_weights, row_mask,
                               options: RuleOptions):  # fmt: skip
    """Per-row loss ``[...]`` for class-last ``logits [..., C]``, differentiated by the rule.

    ``targets`` are integer labels ``[...]`` or probabilities ``[..., C]``; ``class_mask``
    (bool ``[..., C]``), ``class_weights`` (``[C]``, a constant) and ``row_mask`` (bool
    ``[...]``) may be None.
    """
    return softmax_cross_entropy_rows_fwd(
        logits, targets, class_mask, class_weights, row_mask, options
    )[0]


def softmax_cross_entropy_rows_fwd(logits, targets, class_mask, class_weights, row_mask, options):
    forward_here = fast.per_platform(row_terms.forward, fast.forward, options=options)
    loss, statistics = forward_here(logits, targets, class_mask, class_weights, row_mask)
    return loss, (logits, targets, class_mask, class_weights, row_mask, statistics)


def softmax_cross_entropy_rows_bwd(options, residuals, g):
    logits, targets, class_mask, class_weights, row_mask, statistics = residuals
    g = whole_cotangent(g, logits, options.axis_name)
    gradient_here = fast.per_platform(
        row_terms.logits_gradient, fast.logits_gradient, options=options
    )
    d_logits = gradient_here(logits, targets, class_mask, class_weights, row_mask, statistics, g)
    d_targets = None
    if not is_indices(targets):
        d_targets = row_terms.probabilities_gradient(
            logits, targets, class_mask, class_weights, row_mask, statistics, g, options
        )
    d_weights = None if class_weights is None else jnp.zeros_like(class_weights)
    return d_logits, d_targets, None, d_weights, None


softmax_cross_entropy_rows.defvjp(softmax_cross_entropy_rows_fwd, softmax_cross_entropy_rows_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def softmax_cross_entropy_rows_fwd_capable(logits, targets, class_mask, class_weights,
                                           row_mask, options: RuleOptions):  # fmt: skip
    """:func:`softmax_cross_entropy_rows` with forward-mode support.

    The tangent is the rule's gradient dotted with the input tangents,
    ``dL = <dL/dz, dz> + <dL/dy, dy>``. Reverse mode transposes that tangent: the gradients
    are rematerialized (``jax.checkpoint``, without its optimization barrier) so that the
    residuals are the logits and the per-row statistics, as in the custom_vjp.
    """
    return softmax_cross_entropy_rows_fwd(
        logits, targets, class_mask, class_weights, row_mask, options
    )[0]


def _rows_jvp(options, primals, tangents):
    logits, targets, class_mask, class_weights, row_mask = primals
    loss, (*_, statistics) = softmax_cross_entropy_rows_fwd(*primals, options)
    d_logits, d_targets = (None if type(t) is jax.custom_derivatives.SymbolicZero else t
                           for t in tangents[:2])  # fmt: skip
    d_targets = None if is_indices(targets) else d_targets

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def tangent(residuals, d_logits, d_targets):
        ones = jnp.ones(loss.shape, loss.dtype)
        gradients = (fast.per_platform(row_terms.logits_gradient, fast.logits_gradient, options=options),
                     functools.partial(row_terms.probabilities_gradient, options=options))  # fmt: skip
        out = jnp.zeros(loss.shape, loss.dtype)
        for gradient, dx in zip(gradients, (d_logits, d_targets)):
            if dx is not None:
                grad = gradient(*residuals, ones).astype(loss.dtype)
                out = out + jnp.sum(grad * dx.astype(loss.dtype), -1)
        return out if options.axis_name is None else lax.psum(out, options.axis_name)

    residuals = (logits, targets, class_mask, class_weights, row_mask, statistics)
    return loss, tangent(residuals, d_logits, d_targets)


softmax_cross_entropy_rows_fwd_capable.defjvp(_rows_jvp, symbolic_zeros=True)

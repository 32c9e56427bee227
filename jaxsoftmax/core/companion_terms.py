"""What a trainer logs beside the loss, from the same pass: ``return_aux=True``.

Each loss can return, per example, four numbers computed from the per-row statistics the
rule already has (:func:`jaxsoftmax.core.row_terms.row_statistics`, ``m`` and ``log_sum``), so no
second pass over the classes is made:

* ``lse = m + log_sum``, the log-sum-exp of the (soft-capped) logits ``x``;
* ``z_loss = beta r lse^2``, the z-loss term alone (0 when ``z_loss=0``);
* ``correct``: the first class of largest logit is the label (for probability targets: the
  target's own first largest class);
* ``entropy = -sum_c s_c log s_c`` of ``s = softmax(x)``. With ``log s_c = x_c - m -
  log_sum`` it is ``log_sum - sum_c s_c (x_c - m)``: both terms are moderate numbers even at
  huge logits, where ``lse - sum_c s_c x_c`` would cancel.

On examples that do not count (``ignore_index``, ``where``, a row without classes) all four
are 0 (``correct`` False), as the loss is.

``lse`` and ``entropy`` are differentiable through the same custom rule. Their gradients
with respect to ``x`` (derived in docs/derivation.md, section *The companions*) are::

    d lse / dx_j = s_j
    d H / dx_j   = -s_j (log s_j + H)

so cotangents ``(g, g_lse, g_H)`` on ``(loss, lse, H)`` give::

    dL/dx = g * (the loss's rule) + s * (g_lse - g_H (log s + H))

and the soft cap's derivative ``1 - (x / cap)^2`` multiplies the whole. A user's own z-loss
or entropy bonus built on these trains correctly; the residuals are the logits, ``m``,
``log_sum`` and ``H``: one more number per row than the loss alone.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.core import row_terms, rule
from jaxsoftmax.core.varying_axes import whole_cotangent


class LossAux(NamedTuple):
    """Per-example companions of a loss (``return_aux=True``), each of the batch shape.

    Attributes:
      lse: log-sum-exp of the (soft-capped) logits, differentiable.
      z_loss: ``z_loss * w[label] * lse**2``, the z-loss term alone (0 without z-loss).
      correct: bool, the first class of largest logit is the label (the target's first
        largest class for probability targets).
      entropy: ``-sum_c p_c log p_c`` of the softmax, differentiable.

    Examples that do not count (ignored, masked) get 0 and False.
    """

    lse: jax.Array
    z_loss: jax.Array
    correct: jax.Array
    entropy: jax.Array


def shifted_entropy(x, statistics, taking_part, options: row_terms.RuleOptions):
    """``H = log_sum - sum_c s_c (x_c - m)`` per row, ``[..., 1]``."""
    top, log_sum = statistics
    shifted = x - top
    if taking_part is not None:
        shifted = jnp.where(taking_part, shifted, -jnp.inf)
    s = jnp.exp(shifted - log_sum)
    # classes without probability (masked, -inf logits) add 0, not 0 * -inf
    return log_sum - row_terms.sum_classes(jnp.where(s > 0, s * shifted, 0.0), options)


def first_largest(values, taking_part, options: row_terms.RuleOptions):
    """The global index of each row's first largest value, ``[...]`` (int32); under
    ``axis_name`` the first over all shards (the largest value by ``pmax``, then the smallest
    index holding it by ``pmin``)."""
    if taking_part is not None:
        values = jnp.where(taking_part, values, -jnp.inf)
    index = jnp.argmax(values, axis=-1).astype(jnp.int32)
    if options.axis_name is None:
        return index
    top = jnp.max(values, axis=-1)
    index = index + lax.axis_index(options.axis_name) * values.shape[-1]
    holder = top == lax.pmax(top, options.axis_name)
    return lax.pmin(jnp.where(holder, index, jnp.iinfo(jnp.int32).max), options.axis_name)


def is_correct(x, targets, class_mask, live, options: row_terms.RuleOptions):
    """bool ``[...]``: the prediction is the label (the target's largest class)."""
    predicted = first_largest(x, class_mask, options)
    if row_terms.is_indices(targets):
        right = predicted == targets.astype(jnp.int32)
    else:
        right = predicted == first_largest(targets, class_mask, options)
    return right if live is None else right & live[..., 0]


def row_companions(x, statistics, class_mask, live, options: row_terms.RuleOptions):
    """``(lse, H)`` per row, ``[...]`` each, 0 on rows that do not count."""
    lse = statistics[0] + statistics[1]
    entropy = shifted_entropy(x, statistics, class_mask, options)
    if live is not None:
        lse, entropy = jnp.where(live, lse, 0.0), jnp.where(live, entropy, 0.0)
    return lse[..., 0], entropy[..., 0]


def companions_gradient(x, statistics, entropy, g_lse, g_entropy, taking_part, live,
                        options: row_terms.RuleOptions):  # fmt: skip
    """``s * (g_lse - g_H (log s + H))``, times the cap's derivative: the companions' part of
    ``dL/dx``. ``entropy``, ``g_lse``, ``g_entropy`` are per row, ``[...]``."""
    top, log_sum = statistics
    log_s = x - top - log_sum
    if taking_part is not None:
        log_s = jnp.where(taking_part, log_s, -jnp.inf)
    if live is not None:  # rows that do not count: log_sum may be -inf, the gradient is 0
        log_s = jnp.where(live, log_s, -jnp.inf)
    s = jnp.exp(log_s)
    g_lse, g_entropy, entropy = (a.astype(x.dtype)[..., None] for a in (g_lse, g_entropy, entropy))
    grad = s * g_lse - g_entropy * jnp.where(s > 0, s * (log_s + entropy), 0.0)
    if options.logit_softcap is not None:
        grad = grad * (1.0 - (x / options.logit_softcap) ** 2)
    return grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def rows_with_companions(logits, targets, class_mask, class_weights, row_mask,
                         options: row_terms.RuleOptions):  # fmt: skip
    """:func:`jaxsoftmax.core.rule.softmax_cross_entropy_rows` that also returns ``lse``,
    ``entropy`` (both differentiable) and ``correct``, per row."""
    return _fwd(logits, targets, class_mask, class_weights, row_mask, options)[0]


def _fwd(logits, targets, class_mask, class_weights, row_mask, options):
    loss, (*_, statistics) = rule.softmax_cross_entropy_rows_fwd(
        logits, targets, class_mask, class_weights, row_mask, options
    )
    x = row_terms.capped(logits, options)
    live = row_terms.live_rows(class_mask, row_mask, options)
    lse, entropy = row_companions(x, statistics, class_mask, live, options)
    correct = is_correct(x, targets, class_mask, live, options)
    residuals = (logits, targets, class_mask, class_weights, row_mask, statistics, entropy)
    return (loss, lse, entropy, correct), residuals


def _bwd(options, residuals, cotangents):
    g, g_lse, g_entropy, _ = cotangents
    logits, targets, class_mask, class_weights, row_mask, statistics, entropy = residuals
    d_logits, *rest = rule.softmax_cross_entropy_rows_bwd(options, residuals[:6], g)
    g_lse, g_entropy = (whole_cotangent(c, logits, options.axis_name) for c in (g_lse, g_entropy))
    x = row_terms.capped(logits, options)
    live = row_terms.live_rows(class_mask, row_mask, options)
    extra = companions_gradient(x, statistics, entropy, g_lse, g_entropy, class_mask, live, options)
    return ((d_logits.astype(x.dtype) + extra).astype(logits.dtype), *rest)


rows_with_companions.defvjp(_fwd, _bwd)


def loss_aux(lse, entropy, correct, r, z_loss: float) -> LossAux:
    """The :class:`LossAux` of the per-row outputs; ``r`` is each row's weight ``w[label]``
    (1 without class weights), broadcastable to ``lse``."""
    z = jnp.zeros_like(lse) if not z_loss else z_loss * lse * lse * r
    return LossAux(lse=lse, z_loss=z, correct=correct, entropy=entropy)

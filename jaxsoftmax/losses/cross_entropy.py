"""``cross_entropy``: the general softmax cross-entropy with PyTorch's options.

The loss of each counted example ``n`` with logits ``z_n`` over ``C`` classes is

.. math::

   \\ell_n = -\\sum_c q_{nc} \\log \\mathrm{softmax}(\\hat z_n)_c
             + \\beta\\, r_n \\operatorname{lse}(\\hat z_n)^2,
   \\qquad q_{nc} = w_c\\big((1-\\varepsilon) y_{nc} + \\varepsilon / K_n\\big),

with ``y`` one-hot (integer targets) or given probabilities, class weights ``w``, label
smoothing ``eps`` spread over the ``K_n`` classes taking part in row ``n`` (all ``C``
without a per-logit ``where``; the sum runs over those classes and a masked class gets
``q = 0``), z-loss coefficient ``beta``, row weight ``r_n = w[label_n]`` for
integer targets (1 for probabilities) and ``hat z = cap * tanh(z / cap)`` under a logit
soft cap. The reductions follow ``torch.nn.functional.cross_entropy``:

* ``"none"``: ``ell_n`` per example (0 for ignored / masked examples),
* ``"sum"``: ``sum_n ell_n``,
* ``"mean"``: ``sum_n ell_n / sum_n r_n`` over counted examples: the number of counted
  examples, or the sum of their target-class weights with integer targets and class weights.

The gradient comes from the hand-derived rule in :mod:`jaxsoftmax.core.rule`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsoftmax.checks import arrays, checked_mode
from jaxsoftmax.checks.logits_call import LogitsCall, LogitsSettings, check_logits_call
from jaxsoftmax.checks.mesh_axes import check_mapped_axis
from jaxsoftmax.checks.options import labels_on_masked_classes_out_of_range, merged_row_mask
from jaxsoftmax.core import companion_terms, row_terms, rule
from jaxsoftmax.core.reduction import reduce_loss
from jaxsoftmax.losses.one_program import one_program


def per_example_loss(call: LogitsCall, *, axis_name=None, forward_mode=False, companions=False):
    """``(loss [batch...], row_weight [batch...])`` of a checked call, and with
    ``companions`` a third element, the :class:`~jaxsoftmax.LossAux` of every example.

    ``row_weight`` is the example's share of a mean's denominator (0 for dropped examples).
    ``axis_name``: the mapped axis the class axis is split over (inside ``shard_map``).
    """
    return rows_and_weights(
        call.logits, call.targets, call.row_mask, call.class_mask, call.class_weights,
        call.vocab_mask, settings=call.settings.without_reduction(), axis_name=axis_name,
        forward_mode=forward_mode,
        companions=companions,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("settings", "axis_name", "forward_mode", "companions"))
def rows_and_weights(logits, targets, row_mask, class_mask, class_weights, vocab_mask, *,
                     settings: LogitsSettings, axis_name, forward_mode, companions):  # fmt: skip
    """The computation after the checks, jitted so eager calls compile once per shape.

    The class axes are moved last, ``ignore_index`` joins the row mask, checked mode's
    deferred label check is staged, the ``vocab_mask`` (``[C]``, this shard's classes under
    ``axis_name``) joins the class mask, and the rule gives each row's loss
    (:mod:`jaxsoftmax.core.rule`; with ``companions`` the :class:`~jaxsoftmax.LossAux` too,
    by :mod:`jaxsoftmax.core.companion_terms`).
    """
    options = settings.options.rule(axis_name)
    ignore_index = settings.options.ignore_index
    logits, targets, class_mask = _classes_last(logits, targets, class_mask, settings)
    row_mask = merged_row_mask(row_mask, targets, ignore_index)
    if settings.label_check is not None:
        _staged_label_check(targets, row_mask, vocab_mask, logits.shape[-1], settings, options)
    if vocab_mask is not None:
        every_row = jnp.broadcast_to(vocab_mask, logits.shape)
        class_mask = every_row if class_mask is None else class_mask & every_row
        if settings.integer and axis_name is None:  # (sharded: done on the global labels)
            targets = labels_on_masked_classes_out_of_range(targets, vocab_mask, ignore_index)
    args = (logits, targets, class_mask, class_weights, row_mask, options)
    if companions:
        loss, lse, entropy, correct = companion_terms.rows_with_companions(*args)
    elif forward_mode:
        loss = rule.softmax_cross_entropy_rows_fwd_capable(*args)
    else:
        loss = rule.softmax_cross_entropy_rows(*args)
    r = row_terms.row_weight(targets, class_weights, logits.shape[-1], loss.dtype, options)
    r = jnp.broadcast_to(r, loss.shape + (1,))[..., 0]
    live = row_terms.live_rows(class_mask, row_mask, options)
    weight = r if live is None else jnp.where(live[..., 0], r, 0.0)
    if companions:
        return loss, weight, companion_terms.loss_aux(lse, entropy, correct, r, options.z_loss)
    return loss, weight


def _classes_last(logits, targets, class_mask, settings: LogitsSettings):
    """The logits, probability targets and class mask with their class axes last."""
    logits = arrays.move_classes_last(logits, settings.axes)
    if not settings.integer:
        targets = arrays.move_classes_last(targets, settings.axes)
    if class_mask is not None:
        class_mask = arrays.move_classes_last(class_mask, settings.axes)
    return logits, targets, class_mask


def _staged_label_check(targets, row_mask, vocab_mask, num_local, settings, options):
    """Checked mode's checkify check of traced labels, against all ``V`` classes."""
    total = num_local
    if options.axis_name is not None:
        total = jax.lax.psum(num_local, options.axis_name)
    name, hint = settings.label_check
    checked_mode.check_labels(
        targets, total, row_mask, name=name, ignore_index=settings.options.ignore_index,
        hint=hint, vocab_mask=vocab_mask if options.axis_name is None else None,
    )  # fmt: skip


def cross_entropy(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    axis=-1,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    axis_name=None,
    checked: bool = False,
    return_aux: bool = False,
    vocab_mask: jax.typing.ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, companion_terms.LossAux]:
    r"""Softmax cross-entropy with the options of PyTorch's ``F.cross_entropy`` and more.

    .. math::

       \ell_n = -\sum_c w_c\big((1-\varepsilon) y_{nc} + \tfrac{\varepsilon}{K_n}\big)
                \log \mathrm{softmax}(\hat z_n)_c + \beta\, r_n\, \mathrm{lse}(\hat z_n)^2

    where ``c`` runs over the ``K_n`` classes taking part in row ``n`` (all ``C``, or those a
    per-logit ``where`` keeps; the softmax is then over those classes too). With ``q_nc``
    the weight of ``log softmax`` in that sum, the gradient, supplied by a
    ``jax.custom_vjp`` rule rather than autodiff, is

    .. math::

       \frac{\partial \ell_n}{\partial z_n}
         = \Big(\big(\textstyle\sum_c q_{nc} + 2\beta r_n \mathrm{lse}\big)\,
           \mathrm{softmax}(\hat z_n) - q_n\Big)\, g_n\, \big(1 - \tanh^2(z_n/\mathrm{cap})\big),

    which for one-hot ``y`` and no option is ``softmax(z) - y`` (the derivation in
    docs/derivation.md).

    Args:
      logits: float ``[..., C]`` (bf16/f16 are computed in f32; f64 stays f64).
      targets: integer class indices ``[...]`` (the logits' shape without the class axes) or
        float probabilities with the logits' shape.
      axis: class axis, or tuple of axes flattened row-major into one class axis.
      where: bool ``[...]`` (examples to count) or the logits' shape (classes taking part:
        masked classes leave the softmax normalizer and the target sum). A row with no
        class left gives 0 and a zero gradient.
      ignore_index: integer targets equal to it are not counted: a zero loss and gradient,
        left out of the mean. ``-100`` by default, PyTorch's padding label; None counts
        every target. Integer targets only (the default is not applied to probabilities).
      label_smoothing: ``eps`` in [0, 1]; the smoothing mass is spread over the classes
        taking part in the row (all ``C`` without ``where``).
      class_weights: float ``[C]``; a constant (no gradient flows to it).
      z_loss: ``beta >= 0``; adds ``beta * r_n * logsumexp(z_n)^2`` (PaLM's z-loss).
      logit_softcap: ``cap > 0``; the softmax sees ``cap * tanh(z / cap)`` (Gemma 2).
      reduction: ``"mean"`` (weighted as above), ``"sum"`` or ``"none"``.
      axis_name: mapped axis (``shard_map`` / ``pmap``) the class axis is split over, for a
        vocabulary-parallel loss; None when each device holds all classes.
      checked: raise on integer targets out of range (other than ``ignore_index``), naming
        the label and its position: a ``ValueError`` before any computation when the
        targets are known in Python (an eager call); when they are traced (under ``jit``),
        a checkify check that needs :func:`jaxsoftmax.checked` as the *outermost* wrapper,
        ``jaxsoftmax.checked(jax.jit(f))`` (``jax.jit(jaxsoftmax.checked(f))`` fails).

    Returns:
      The reduced loss (a scalar) or, with ``reduction="none"``, one loss per example, in
      the logits' dtype. If every example is ignored or masked, ``"mean"`` returns 0.

    Integer labels out of range (other than ``ignore_index``) cannot raise under ``jit``:
    their example's loss and gradient are NaN. Use ``checked=True`` for an error.

    Reverse mode only: the rule is a ``jax.custom_vjp``, so ``jax.grad``, ``jax.vjp`` and
    ``jax.jacrev`` work, and so do derivatives of the gradient (grad of grad,
    ``jax.hessian``), but ``jax.jvp`` and ``jax.jacfwd`` of the loss raise a ``TypeError``.
    For forward mode use :func:`~jaxsoftmax.softmax_cross_entropy` or
    :func:`~jaxsoftmax.softmax_cross_entropy_with_integer_labels` (same rule, through a
    ``custom_jvp``; no options), see docs/custom-gradients.md.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsoftmax import cross_entropy
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
      >>> print(f"{float(cross_entropy(logits, jnp.array([0, 1]))):.4f}")
      0.3185
      >>> losses = cross_entropy(logits, jnp.array([0, -100]), reduction="none")
      >>> print([f"{loss:.4f}" for loss in losses])
      ['0.4170', '0.0000']
    """
    arrays.check_flag(return_aux, "return_aux")
    check_mapped_axis(axis_name)
    call = check_logits_call(
        logits, targets, axis=axis, where=where, ignore_index=ignore_index,
        label_smoothing=label_smoothing, class_weights=class_weights, z_loss=z_loss,
        logit_softcap=logit_softcap, reduction=reduction, checked=checked,
        sharded=axis_name is not None, vocab_mask=vocab_mask,
    )  # fmt: skip
    return _cross_entropy(call, axis_name, return_aux)


@one_program
def _cross_entropy(call: LogitsCall, axis_name, return_aux: bool):
    """The loss of a checked call: each example's loss, then the reduction."""
    out = per_example_loss(call, axis_name=axis_name, companions=return_aux)
    loss = reduce_loss(out[0], out[1], call.settings.options.reduction)
    loss = loss.astype(call.logits.dtype)
    return (loss, out[2]) if return_aux else loss

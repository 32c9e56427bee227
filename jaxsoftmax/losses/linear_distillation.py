"""``linear_distillation_loss``: both classifiers and the distillation loss fused, tile by tile.

Distillation builds two ``[N, V]`` logits, the student's ``z_s = h_s W_s^T + b_s`` and the
teacher's ``z_t = h_t W_t^T + b_t``. This loss computes the same value and gradients as
``distillation_loss(z_s, z_t, ...)`` while holding one ``[T, Vc]`` tile of each at a time.
The arguments are checked by
:func:`jaxsoftmax.checks.distillation_call.check_linear_distillation`; the rule and how the
tiles are visited are :mod:`jaxsoftmax.tiles.distillation` (forward in
:mod:`jaxsoftmax.tiles.distillation_forward`, backward in
:mod:`jaxsoftmax.tiles.distillation_backward`).
"""

from __future__ import annotations

import jax

from jaxsoftmax.checks.distillation_call import DistillationCall, check_linear_distillation
from jaxsoftmax.core.reduction import reduce_loss
from jaxsoftmax.losses.one_program import one_program
from jaxsoftmax.tiles import distillation as fused
from jaxsoftmax.tiles.distillation_plan import DistillationPlan


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
    :mod:`jaxsoftmax.tiles.distillation` and docs/distillation.md.

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
    call = check_linear_distillation(
        student_hidden, student_classifier, teacher_hidden, teacher_classifier, labels=labels,
        divergence=divergence, temperature=temperature, beta=beta, hard_weight=hard_weight,
        where=where, ignore_index=ignore_index, vocab_mask=vocab_mask, reduction=reduction,
        student_bias=student_bias, teacher_bias=teacher_bias,
        classifier_layout=classifier_layout, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
        checked=checked,
    )  # fmt: skip
    plan = fused.make_plan(call, call.student, call.teacher, call.num_classes)
    return _linear_distillation_loss(call, plan)


@one_program
def _linear_distillation_loss(call: DistillationCall, plan: DistillationPlan):
    """The loss of a checked call: each row's loss and weight on the tiles, then the
    reduction."""
    loss, weight = fused.rows_and_weights(
        call.student, call.teacher, call.labels, call.row_mask, call.vocab_mask, plan
    )
    out = reduce_loss(loss.reshape(call.batch), weight.reshape(call.batch), call.options.reduction)
    return out.astype(call.student.hidden.dtype)

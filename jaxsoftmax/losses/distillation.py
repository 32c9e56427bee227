"""``distillation_loss``: a student's softmax against a teacher's, with the derived rule.

Knowledge distillation (Hinton, Vinyals and Dean, 2015) trains a student on a teacher's
output distribution. With temperature ``T``, ``p = softmax(z_s / T)`` and ``q = softmax(z_t
/ T)``, each counted example's loss is ``T^2 D(p, q) + h CE(z_s, label)``: one of three
divergences ``D`` (:mod:`jaxsoftmax.core.divergences`, derived in docs/derivation.md section 9)
and, with ``hard_weight`` ``h > 0``, the usual cross-entropy on the labels at temperature 1
(the library's rule, :mod:`jaxsoftmax.core.rule`). Reductions as in
:func:`jaxsoftmax.cross_entropy`: ``"mean"`` over the counted examples, ``"sum"``, ``"none"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsoftmax.checks import arrays
from jaxsoftmax.checks.distillation_call import check_logits_distillation
from jaxsoftmax.checks.options import labels_on_masked_classes_out_of_range
from jaxsoftmax.core import divergences, row_terms, rule
from jaxsoftmax.core.reduction import reduce_loss


def distillation_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: jax.typing.ArrayLike | None = None,
    hard_weight: float = 0.0,
    axis: int = -1,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    vocab_mask: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    checked: bool = False,
) -> jax.Array:
    r"""The distillation loss between a student's and a teacher's logits.

    With ``p = softmax(z_s / T)`` (student) and ``q = softmax(z_t / T)`` (teacher), the loss
    of each counted example is

    .. math::

       \ell = T^2 D(p, q) + h\, \mathrm{CE}(z_s, y)

    where ``D`` is, by ``divergence``:

    * ``"forward_kl"``: ``KL(q || p) = sum_c q_c (log q_c - log p_c)``, the student covers
      the teacher's distribution (Hinton et al.); gradient ``T (p - q)`` for ``z_s``;
    * ``"reverse_kl"``: ``KL(p || q) = sum_c p_c (log p_c - log q_c)``, mode-seeking;
    * ``"jsd"``: the generalized Jensen-Shannon divergence ``beta KL(q || m) + (1 - beta)
      KL(p || m)`` with ``m = beta q + (1 - beta) p``; at ``beta = 0.5`` the symmetric JSD,
      at most ``log 2``.

    The factor ``T^2`` keeps the gradients' magnitude comparable across temperatures: the
    soft targets' gradient with respect to the logits scales as ``1 / T^2`` at large ``T``
    (Hinton et al.), so a mix with the hard loss need not be retuned when ``T`` changes.
    ``h CE(z_s, y)`` is the softmax cross-entropy of the student's logits (temperature 1)
    with the labels, added with ``hard_weight`` ``h``.

    Both logits get their true gradients from the hand-derived rule (section 9 of
    docs/derivation.md): the student's for training it, the teacher's for those who train
    both. It is a ``jax.custom_jvp`` whose tangent is the derived gradient, so ``jax.grad``
    and ``jax.jvp`` (and ``jacfwd``, ``jacrev``) all run the same rule; the residuals are the
    logits and a few numbers per row, never another ``[N, V]`` array. An input that is not
    differentiated (a frozen teacher) costs no gradient computation.

    Args:
      student_logits: float ``[..., V]`` (class axis ``axis``).
      teacher_logits: float, the student's shape (the same vocabulary). Another float dtype
        than the student's is allowed (a bf16 teacher for a float32 student): both are
        computed in the wider one.
      divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
      temperature: ``T > 0``, dividing both logits before the softmax (not the hard term's).
      beta: the JSD's weight of the teacher in the mixture, ``0 < beta < 1`` (at 0 or 1 the
        divergence is identically 0); only with ``divergence="jsd"``.
      labels: integer class indices, the logits' shape without the class axis; needed for
        ``hard_weight > 0`` and for ``ignore_index``.
      hard_weight: ``h >= 0``, the weight of the labels' cross-entropy.
      axis: the class axis of both logits.
      where: bool, one entry per example: examples to count (others give 0 and no gradient).
      ignore_index: a label value whose examples are left out (of both terms), e.g. -100
        for padding, as in PyTorch.
      vocab_mask: bool ``[V]``, the classes that exist: the others get no probability in
        either distribution and a zero gradient (a vocabulary padded to a multiple of 128).
        A label on a masked class is a bad label: its example's loss is NaN.
      reduction: ``"mean"`` (over the counted examples; 0 if none), ``"sum"`` or ``"none"``.
      checked: with ``hard_weight > 0``, check that every counted label is a class (and one
        ``vocab_mask`` keeps): a ``ValueError`` before any computation when the labels are
        known in Python; when they are traced, a checkify check that needs
        :func:`jaxsoftmax.checked` as the outermost wrapper (as in
        :func:`~jaxsoftmax.cross_entropy`).

    Returns:
      The reduced loss, or one per example with ``reduction="none"`` (0 where not counted),
      in the student's dtype. Computed in float32 for bf16/f16, float64 for float64.

    Unchecked, a label out of range (or on a masked class) makes its example's loss and
    gradient NaN under the hard term: under ``jit`` it cannot raise. ``checked=True`` raises.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> student = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
      >>> teacher = jnp.array([[3.0, 0.5, 0.0], [0.0, 3.0, 1.0]])
      >>> print(f"{float(distillation_loss(student, teacher, temperature=2.0)):.4f}")
      0.1480
      >>> q = jax.nn.softmax(teacher / 2.0)
      >>> kl = jnp.sum(q * (jnp.log(q) - jax.nn.log_softmax(student / 2.0)), axis=-1)
      >>> print(f"{float(4.0 * jnp.mean(kl)):.4f}")
      0.1480
    """
    call = check_logits_distillation(
        student_logits, teacher_logits, divergence=divergence, temperature=temperature,
        beta=beta, labels=labels, hard_weight=hard_weight, axis=axis, where=where,
        ignore_index=ignore_index, vocab_mask=vocab_mask, reduction=reduction, checked=checked,
    )  # fmt: skip
    return _distillation(
        call.student, call.teacher, call.labels, call.row_mask, call.vocab_mask,
        axes=call.axes, options=call.divergence, hard_weight=call.hard_weight,
        ignore_index=call.options.ignore_index, reduction=call.options.reduction,
    ).astype(call.student.dtype)  # fmt: skip


@functools.partial(
    jax.jit, static_argnames=("axes", "options", "hard_weight", "ignore_index", "reduction")
)
def _distillation(
    student_logits, teacher_logits, labels, row_mask, vocab_mask, *, axes, options,
    hard_weight, ignore_index, reduction,
):  # fmt: skip
    """The loss after validation, compiled once per shape and options."""
    student = arrays.move_classes_last(student_logits, axes)
    teacher = arrays.move_classes_last(teacher_logits, axes)
    if ignore_index is not None:
        kept = labels != ignore_index
        row_mask = kept if row_mask is None else row_mask & kept
    loss = divergences.distillation_rows(student, teacher, vocab_mask, row_mask, options)
    if hard_weight:
        class_mask = None
        if vocab_mask is not None:  # a label on a class that does not exist is a bad label
            class_mask = jnp.broadcast_to(vocab_mask, student.shape)
            labels = labels_on_masked_classes_out_of_range(labels, vocab_mask, ignore_index)
        hard = rule.softmax_cross_entropy_rows_fwd_capable(
            student, labels, class_mask, None, row_mask, row_terms.RuleOptions()
        )
        loss = loss + hard_weight * hard.astype(loss.dtype)
    weight = jnp.ones(loss.shape, loss.dtype)
    if row_mask is not None:
        weight = jnp.where(row_mask, weight, 0.0)
    return reduce_loss(loss, weight, reduction)

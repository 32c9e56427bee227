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

from jaxsoftmax.checks import arrays, checked_mode
from jaxsoftmax.checks.options import check_vocab_mask, labels_on_masked_classes_out_of_range
from jaxsoftmax.core import divergences, row_terms, rule
from jaxsoftmax.core.reduction import reduce_loss

DIVERGENCES = divergences.DIVERGENCES


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
    student_logits = _check_logits(student_logits, "student_logits")
    teacher_logits = _check_logits(teacher_logits, "teacher_logits")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have student_logits' shape {tuple(student_logits.shape)} "
            f"(the same examples and vocabulary); got {arrays.describe(teacher_logits)}. "
            "Nothing is broadcast."
        )
    if isinstance(axis, (tuple, list)):
        raise TypeError(f"axis must be one int (the class axis); got {axis!r}.")
    axes = arrays.class_axes(axis, student_logits.ndim)
    num_classes = arrays.check_num_classes(student_logits.shape, axes)
    options = check_divergence_options(divergence, temperature, beta)
    hard_weight = arrays.check_number(hard_weight, "hard_weight", low=0.0)
    reduction = arrays.check_reduction(reduction)
    ignore_index = arrays.check_ignore_index(ignore_index, True)
    check_labels_needed(labels, hard_weight, ignore_index)
    if labels is not None:
        labels = arrays.check_integer_labels(labels, student_logits.shape, axes, name="labels")
    row_mask = None
    if where is not None:
        row_mask, class_mask = arrays.check_where(where, student_logits.shape, axes)
        if class_mask is not None:
            raise ValueError(
                f"where must have one entry per example, shape "
                f"{arrays.batch_shape(student_logits.shape, axes)}; got {arrays.describe(where)}. "
                "Classes to leave out of every row go in vocab_mask=."
            )
    vocab_mask = check_vocab_mask(vocab_mask, num_classes)
    if arrays.check_flag(checked, "checked") and hard_weight:
        check_labels(labels, num_classes, row_mask, ignore_index, vocab_mask)
    return _distillation(
        student_logits,
        teacher_logits,
        labels,
        row_mask,
        vocab_mask,
        axes=axes,
        options=options,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        reduction=reduction,
    ).astype(student_logits.dtype)


def _check_logits(logits, name: str):
    logits = arrays.as_array(logits, name)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float16, bfloat16, float32 or float64); "
            f"got {arrays.describe(logits)}."
        )
    if logits.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the class axis); got a scalar.")
    return logits


def check_divergence_options(divergence, temperature, beta) -> divergences.DivergenceOptions:
    """The divergence, ``T`` and ``beta``, checked (shared by every distillation loss)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}; got {divergence!r}.")
    temperature = arrays.check_number(temperature, "temperature", low=0.0, low_open=True)
    beta = arrays.check_number(beta, "beta", low=0.0, high=1.0)
    if divergence == "jsd" and beta in (0.0, 1.0):
        other = "forward_kl" if beta == 0.0 else "reverse_kl"
        raise ValueError(
            f"beta must be strictly between 0 and 1 for divergence='jsd'; got {beta}: there "
            "the mixture equals one of the two distributions and the divergence is "
            f"identically 0. Did you mean divergence={other!r} (the limit some libraries "
            "give beta = 0 or 1)?"
        )
    if divergence != "jsd" and beta != 0.5:
        raise ValueError(
            f"beta weighs the Jensen-Shannon mixture and applies to divergence='jsd' only; "
            f"got beta={beta} with divergence={divergence!r}."
        )
    return divergences.DivergenceOptions(divergence, temperature, beta)


def check_labels_needed(labels, hard_weight: float, ignore_index) -> None:
    """``labels`` must be given when the hard term or ``ignore_index`` uses them."""
    if labels is not None:
        return
    if hard_weight > 0:
        raise ValueError(
            f"hard_weight={hard_weight} adds the labels' cross-entropy, but labels is None. "
            "Pass labels=, or hard_weight=0.0 for the divergence alone."
        )
    if ignore_index is not None:
        raise ValueError(
            f"ignore_index={ignore_index} leaves out the examples whose label equals it, but "
            "labels is None. Pass labels=, or where= to choose examples."
        )


def check_labels(labels, num_classes: int, row_mask, ignore_index, vocab_mask) -> None:
    """Checked mode's label check (see :mod:`jaxsoftmax.checks.checked_mode`): now when the labels are
    known in Python, else staged as a checkify check."""
    hint = " Leave an example out with ignore_index= or where=."
    keywords = dict(name="labels", ignore_index=ignore_index, hint=hint, vocab_mask=vocab_mask)
    if checked_mode.check_labels_or_defer(labels, num_classes, row_mask, **keywords):
        checked_mode.check_labels(labels, num_classes, row_mask, **keywords)


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

"""The distillation losses' arguments, checked into one value.

:func:`check_logits_distillation` checks :func:`~jaxsoftmax.distillation_loss`'s (two
logits of one shape); :func:`check_linear_distillation` checks
:func:`~jaxsoftmax.linear_distillation_loss`'s and
:func:`~jaxsoftmax.sharded_linear_distillation_loss`'s (two linear heads, by
:func:`~jaxsoftmax.checks.linear_head.check_linear_head`). Both share the divergence's
options (:func:`check_divergence_options`), the loss options
(:func:`~jaxsoftmax.checks.options.check_options`), the labels the hard term needs and checked
mode's label check. Nothing below the public functions checks again.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsoftmax.checks import arrays, checked_mode, linear_head
from jaxsoftmax.checks.linear_head import LinearHead, TileOptions
from jaxsoftmax.checks.logits_call import LABEL_HINT
from jaxsoftmax.checks.options import (
    LossOptions,
    check_options,
    check_vocab_mask,
    labels_on_masked_classes_out_of_range,
    merged_row_mask,
)
from jaxsoftmax.core import divergences


class DistillationCall(NamedTuple):
    """A fused distillation call, checked: both heads (tokens flattened), ``labels [N]``
    (None unless the hard term reads them), ``row_mask [N]`` (``where`` and
    ``ignore_index`` merged), ``vocab_mask [V]``, the tokens' shape, ``V`` and the static
    options."""

    student: LinearHead
    teacher: LinearHead
    labels: jax.Array | None
    row_mask: jax.Array | None
    vocab_mask: jax.Array | None
    batch: tuple
    num_classes: int
    options: LossOptions
    divergence: divergences.DivergenceOptions
    hard_weight: float
    tiles: TileOptions


def check_divergence_options(divergence, temperature, beta) -> divergences.DivergenceOptions:
    """The divergence, ``T`` and ``beta``, checked (shared by every distillation loss)."""
    if divergence not in divergences.DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {divergences.DIVERGENCES}; got {divergence!r}."
        )
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


def check_hard_term(labels, hard_weight, ignore_index, reduction, num_classes):
    """``(hard_weight, LossOptions)``; ``labels`` must be given when the hard term or
    ``ignore_index`` uses them."""
    hard_weight = arrays.check_number(hard_weight, "hard_weight", low=0.0)
    options, _ = check_options(
        ignore_index=ignore_index, reduction=reduction, num_classes=num_classes
    )
    if labels is None and hard_weight > 0:
        raise ValueError(
            f"hard_weight={hard_weight} adds the labels' cross-entropy, but labels is None. "
            "Pass labels=, or hard_weight=0.0 for the divergence alone."
        )
    if labels is None and options.ignore_index is not None:
        raise ValueError(
            f"ignore_index={options.ignore_index} leaves out the examples whose label equals "
            "it, but labels is None. Pass labels=, or where= to choose examples."
        )
    return hard_weight, options


def check_labels_in_range(labels, num_classes: int, row_mask, ignore_index, vocab_mask) -> None:
    """Checked mode's label check (see :mod:`jaxsoftmax.checks.checked_mode`): now when the
    labels are known in Python, else staged as a checkify check."""
    keywords = dict(name="labels", ignore_index=ignore_index, hint=LABEL_HINT,
                    vocab_mask=vocab_mask)  # fmt: skip
    if checked_mode.check_labels_or_defer(labels, num_classes, row_mask, **keywords):
        checked_mode.check_labels(labels, num_classes, row_mask, **keywords)


def check_distillation_logits(logits, name: str):
    """``logits`` as a float array with a class axis."""
    logits = arrays.as_array(logits, name)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float16, bfloat16, float32 or float64); "
            f"got {arrays.describe(logits)}."
        )
    if logits.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the class axis); got a scalar.")
    return logits


class LogitsDistillationCall(NamedTuple):
    """A distillation call on logits, checked: both logits, ``labels`` (or None),
    ``row_mask`` (``where``; ``ignore_index`` is merged in the computation), ``vocab_mask``,
    the class axes and the static options."""

    student: jax.Array
    teacher: jax.Array
    labels: jax.Array | None
    row_mask: jax.Array | None
    vocab_mask: jax.Array | None
    axes: tuple
    options: LossOptions
    divergence: divergences.DivergenceOptions
    hard_weight: float


def check_logits_distillation(
    student_logits, teacher_logits, *, divergence="forward_kl", temperature=1.0, beta=0.5,
    labels=None, hard_weight=0.0, axis=-1, where=None, ignore_index=None, vocab_mask=None,
    reduction="mean", checked=False,
) -> LogitsDistillationCall:  # fmt: skip
    """Checks :func:`~jaxsoftmax.distillation_loss`'s arguments (see there)."""
    student = check_distillation_logits(student_logits, "student_logits")
    teacher = check_distillation_logits(teacher_logits, "teacher_logits")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits must have student_logits' shape {tuple(student.shape)} "
            f"(the same examples and vocabulary); got {arrays.describe(teacher)}. "
            "Nothing is broadcast."
        )
    if isinstance(axis, (tuple, list)):
        raise TypeError(f"axis must be one int (the class axis); got {axis!r}.")
    axes = arrays.class_axes(axis, student.ndim)
    num_classes = arrays.check_num_classes(student.shape, axes)
    divergence = check_divergence_options(divergence, temperature, beta)
    hard_weight, options = check_hard_term(labels, hard_weight, ignore_index, reduction,
                                           num_classes)  # fmt: skip
    if labels is not None:
        labels = arrays.check_integer_labels(labels, student.shape, axes, name="labels")
    row_mask = _example_mask(where, student.shape, axes)
    vocab_mask = check_vocab_mask(vocab_mask, num_classes)
    if arrays.check_flag(checked, "checked") and hard_weight:
        check_labels_in_range(labels, num_classes, row_mask, options.ignore_index, vocab_mask)
    return LogitsDistillationCall(student, teacher, labels, row_mask, vocab_mask, axes, options,
                                  divergence, hard_weight)  # fmt: skip


def _example_mask(where, shape, axes):
    """``where`` as a mask of examples; a mask of classes is refused (that is vocab_mask=)."""
    if where is None:
        return None
    row_mask, class_mask = arrays.check_where(where, shape, axes)
    if class_mask is not None:
        raise ValueError(
            f"where must have one entry per example, shape "
            f"{arrays.batch_shape(shape, axes)}; got {arrays.describe(where)}. "
            "Classes to leave out of every row go in vocab_mask=."
        )
    return row_mask


def check_linear_distillation(
    student_hidden, student_classifier, teacher_hidden, teacher_classifier, *, labels=None,
    divergence="forward_kl", temperature=1.0, beta=0.5, hard_weight=0.0, where=None,
    ignore_index=None, vocab_mask=None, reduction="mean", student_bias=None, teacher_bias=None,
    classifier_layout="vd", token_chunk=None, vocab_chunk=None, checked=False,
) -> DistillationCall:  # fmt: skip
    """Checks a fused distillation's arguments (see
    :func:`~jaxsoftmax.linear_distillation_loss`) and flattens the tokens."""
    tiles = linear_head.check_tile_options(classifier_layout, token_chunk, vocab_chunk)
    student, batch = linear_head.check_linear_head(
        student_hidden, student_classifier, student_bias, tiles.layout, prefix="student_"
    )
    teacher, teacher_batch = linear_head.check_linear_head(
        teacher_hidden, teacher_classifier, teacher_bias, tiles.layout, prefix="teacher_"
    )
    num_classes = _same_vocabulary(student, teacher, tiles.layout)
    if teacher_batch != batch:
        raise ValueError(
            f"teacher_hidden must hold the student's tokens, shape {batch} + (d_t,); got "
            f"{arrays.describe(teacher_hidden)}. Nothing is broadcast."
        )
    divergence = check_divergence_options(divergence, temperature, beta)
    hard_weight, options = check_hard_term(labels, hard_weight, ignore_index, reduction,
                                           num_classes)  # fmt: skip
    if labels is not None:
        labels = _as_int32(linear_head.check_token_labels(labels, batch))
    row_mask = linear_head.check_token_mask(
        where, batch, hint=" (Classes to leave out go in vocab_mask=.)"
    )
    row_mask = merged_row_mask(row_mask, labels, options.ignore_index)
    vocab_mask = check_vocab_mask(vocab_mask, num_classes)
    if arrays.check_flag(checked, "checked") and hard_weight:
        check_labels_in_range(labels, num_classes, row_mask, options.ignore_index, vocab_mask)
    labels = _hard_term_labels(labels, hard_weight, vocab_mask, options.ignore_index)
    return DistillationCall(student, teacher, labels, row_mask, vocab_mask, batch, num_classes,
                            options, divergence, hard_weight, tiles)  # fmt: skip


def _same_vocabulary(student: LinearHead, teacher: LinearHead, layout: str) -> int:
    """``V``, which both classifiers must have."""
    num_classes = linear_head.num_classes(student, layout)
    if linear_head.num_classes(teacher, layout) != num_classes:
        raise ValueError(
            f"teacher_classifier must have the student's vocabulary, V = {num_classes} "
            f"(student_classifier's {arrays.describe(student.classifier)}); got "
            f"{arrays.describe(teacher.classifier)}. Distillation compares the two models' "
            "distributions class by class."
        )
    return num_classes


def _as_int32(labels):
    """int64 labels (under x64) as int32; labels out of range stay out of range."""
    if labels.dtype.itemsize > 4:
        return jnp.clip(labels, -(2**31), 2**31 - 1).astype(jnp.int32)
    return labels


def _hard_term_labels(labels, hard_weight, vocab_mask, ignore_index):
    """The labels the hard term reads (None without it); a label on a class the
    ``vocab_mask`` leaves out becomes a bad label."""
    if not hard_weight:
        return None
    if vocab_mask is not None:
        return labels_on_masked_classes_out_of_range(labels, vocab_mask, ignore_index)
    return labels

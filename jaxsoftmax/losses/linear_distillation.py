"""``linear_distillation_loss``: both classifiers and the distillation loss fused, tile by tile.

Distillation builds two ``[N, V]`` logits, the student's ``z_s = h_s W_s^T + b_s`` and the
teacher's ``z_t = h_t W_t^T + b_t``. This loss computes the same value and gradients as
``distillation_loss(z_s, z_t, ...)`` while holding one ``[T, Vc]`` tile of each at a time.
Here are the public function, its checks and the per-row losses' weights; the rule and how
the tiles are visited are :mod:`jaxsoftmax.tiles.distillation` (forward in
:mod:`jaxsoftmax.tiles.distillation_forward`, backward in
:mod:`jaxsoftmax.tiles.distillation_backward`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsoftmax.checks import arrays
from jaxsoftmax.checks.linear_head import LAYOUTS, LinearHead, check_chunk, check_float
from jaxsoftmax.checks.options import check_vocab_mask, labels_on_masked_classes_out_of_range
from jaxsoftmax.core import divergences, row_terms
from jaxsoftmax.core.reduction import reduce_loss
from jaxsoftmax.losses.distillation import (
    check_divergence_options,
    check_labels,
    check_labels_needed,
)
from jaxsoftmax.tiles.distillation import distillation_rows
from jaxsoftmax.tiles.distillation_plan import DistillationPlan, compute_dtype
from jaxsoftmax.tiles.sizes import tiles_by_platform


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


def make_plan(call: Call, num_tokens: int, num_local: int, axis_name=None) -> DistillationPlan:
    """The plan for ``num_tokens`` rows against ``num_local`` classes (one shard's when the
    vocabulary is split over ``axis_name``), with the call's chunks or each backend's."""
    tiles = tiles_by_platform(num_tokens, num_local, call.token_chunk, call.vocab_chunk)
    _, token_chunk, vocab_chunk = next(t for t in tiles if t[0] == "default")
    return DistillationPlan(
        divergence=call.divergence,
        hard_weight=call.hard_weight,
        layout=call.layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        options=row_terms.RuleOptions(axis_name=axis_name),
        num_classes=None if axis_name is None else call.num_classes,
        tiles=tiles,
    )


def rows_and_weights(call: Call, plan: DistillationPlan):
    """Per-token losses ``[N]`` and their weights in a mean (1, or 0 where not counted)."""
    num_tokens = call.student.hidden.shape[0]
    dtype = compute_dtype(call.student, call.teacher)
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
    if classifier_layout not in LAYOUTS:
        raise ValueError(
            f"classifier_layout must be one of {LAYOUTS} ([V, d] or [d, V]); got "
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
        token_chunk=check_chunk(token_chunk, "token_chunk"),
        vocab_chunk=check_chunk(vocab_chunk, "vocab_chunk"),
    )


def _check_model(name: str, hidden, classifier, bias, layout: str) -> LinearHead:
    """One model's ``(hidden, classifier, bias)``: float arrays of matching widths."""
    hidden = check_float(hidden, f"{name}_hidden")
    classifier = check_float(classifier, f"{name}_classifier")
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
        bias = check_float(bias, f"{name}_bias")
    return LinearHead(hidden, classifier, bias)

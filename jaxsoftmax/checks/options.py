"""The loss options every public loss shares, checked in one place.

``cross_entropy``, the optax drop-ins, ``linear_cross_entropy`` and the sharded losses take
the same options with the same meaning (see :func:`jaxsoftmax.cross_entropy`):
``ignore_index``, ``label_smoothing``, ``class_weights``, ``z_loss``, ``logit_softcap`` and
``reduction`` (``where`` is checked against each loss's shapes in
:mod:`jaxsoftmax.checks.arrays`). :func:`check_options` validates them before any
computation (the reduction itself is :func:`jaxsoftmax.core.reduction.reduce_loss`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxsoftmax.checks import arrays
from jaxsoftmax.core import row_terms

REDUCTIONS = arrays.REDUCTIONS


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The static options of a loss call, checked (hashable, for ``jit``)."""

    ignore_index: int | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    reduction: str = "mean"

    def rule(self, axis_name=None) -> row_terms.RuleOptions:
        """The options the derived rule needs, for a class axis split over ``axis_name``."""
        return row_terms.RuleOptions(
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            logit_softcap=self.logit_softcap,
            axis_name=axis_name,
        )


def check_options(
    *,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    logit_softcap=None,
    reduction="mean",
    num_classes: int,
    integer_targets: bool = True,
):
    """``(LossOptions, class_weights)``, checked; a clear exception names a bad argument.

    ``class_weights`` comes back as an array of ``num_classes`` weights with no gradient
    (or None); ``ignore_index`` is refused for probability targets, as in PyTorch.
    """
    options = LossOptions(
        ignore_index=arrays.check_ignore_index(ignore_index, integer_targets),
        label_smoothing=arrays.check_number(label_smoothing, "label_smoothing", low=0.0, high=1.0),
        z_loss=arrays.check_number(z_loss, "z_loss", low=0.0),
        logit_softcap=arrays.check_number(
            logit_softcap, "logit_softcap", low=0.0, low_open=True, allow_none=True
        ),
        reduction=arrays.check_reduction(reduction),
    )
    return options, arrays.check_class_weights(class_weights, num_classes)


def check_vocab_mask(vocab_mask, num_classes: int):
    """``vocab_mask`` as a bool array of ``num_classes`` entries (or None), checked: the
    classes that exist, shared by every row."""
    if vocab_mask is None:
        return None
    vocab_mask = arrays.as_array(vocab_mask, "vocab_mask")
    if vocab_mask.dtype != jnp.bool_ or vocab_mask.size != num_classes or vocab_mask.ndim < 1:
        raise ValueError(
            f"vocab_mask must be a boolean array of one entry per class, shape ({num_classes},)"
            f"; got {arrays.describe(vocab_mask)}. (A mask per example and class is where=.)"
        )
    return vocab_mask.reshape(num_classes)


def labels_on_masked_classes_out_of_range(labels, vocab_mask, ignore_index):
    """``labels`` with every label on a class ``vocab_mask`` leaves out replaced by one
    outside ``[0, C)``: a bad label, whose example's loss and gradient the rule makes NaN
    (``-1``, or ``C`` where ``ignore_index`` is ``-1``). Labels already out of range and
    ``ignore_index`` stay as they are."""
    num_classes = vocab_mask.shape[0]
    inside = (labels >= 0) & (labels < num_classes)
    masked = inside & ~jnp.take(vocab_mask, jnp.clip(labels, 0, num_classes - 1))
    sentinel = jnp.asarray(num_classes if ignore_index == -1 else -1, labels.dtype)
    return jnp.where(masked, sentinel, labels)


def merged_row_mask(row_mask, labels, ignore_index):
    """``where`` and ``labels != ignore_index`` as one row mask (None: every row counts)."""
    if ignore_index is None:
        return row_mask
    kept = labels != ignore_index
    return kept if row_mask is None else row_mask & kept

"""The loss options every public loss shares, checked in one place, and the reduction.

``cross_entropy``, the optax drop-ins, ``linear_cross_entropy`` and the sharded losses take
the same options with the same meaning (see :func:`jaxsoftmax.cross_entropy`):
``ignore_index``, ``label_smoothing``, ``class_weights``, ``z_loss``, ``logit_softcap`` and
``reduction`` (``where`` is checked against each loss's shapes in
:mod:`jaxsoftmax.checks.arrays`). :func:`check_options` validates them before any
computation; :func:`reduce_loss` is the one place the PyTorch reductions are written.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

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


def reduce_loss(loss, row_weight, reduction: str, batch_axis_names: tuple = ()):
    """A PyTorch reduction of per-example losses; a mean over no counted example is 0.

    ``"mean"`` is ``sum_n loss_n / sum_n r_n`` with ``r_n`` each example's weight
    (``row_weight``: ``w[label]`` with class weights, else 1; 0 where not counted). With
    ``batch_axis_names`` (inside ``shard_map``, examples split over those mesh axes) both
    sums are finished by a ``psum``, so the mean equals the single-device one, not a mean
    of the shards' means.
    """
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if batch_axis_names:
        total = lax.psum(total, batch_axis_names)
    if reduction == "sum":
        return total
    denominator = jnp.sum(row_weight)
    if batch_axis_names:
        denominator = lax.psum(denominator, batch_axis_names)
    counted = denominator > 0
    return jnp.where(counted, total / jnp.where(counted, denominator, 1.0), 0.0)


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

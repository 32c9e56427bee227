"""A fused cross-entropy call's arguments, checked into one value.

:func:`check_linear_call` checks what :func:`~jaxsoftmax.linear_cross_entropy` and
:func:`~jaxsoftmax.sharded_linear_cross_entropy` take (the linear head, the labels, ``where``,
the loss options, the vocabulary mask, the tiling) and returns one :class:`LinearCall`, with
the tokens flattened and ``where`` and ``ignore_index`` merged into one row mask. Nothing
below the public functions checks again.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsoftmax.checks import linear_head
from jaxsoftmax.checks.linear_head import LinearHead, TileOptions
from jaxsoftmax.checks.options import (
    LossOptions,
    check_options,
    check_vocab_mask,
    labels_on_masked_classes_out_of_range,
    merged_row_mask,
)


class LinearCall(NamedTuple):
    """A fused loss call, checked: the head (tokens flattened), per-token ``labels [N]`` and
    ``row_mask [N]`` (``where`` and ``ignore_index`` merged; None: every token counts), the
    class weights and ``vocab_mask [V]`` (or None), the tokens' shape ``batch``, ``V``, and
    the static options."""

    head: LinearHead
    labels: jax.Array
    class_weights: jax.Array | None
    row_mask: jax.Array | None
    vocab_mask: jax.Array | None
    batch: tuple
    num_classes: int
    options: LossOptions
    tiles: TileOptions


def check_linear_call(
    hidden, classifier, labels, *, bias=None, where=None, ignore_index=None,
    label_smoothing=0.0, class_weights=None, z_loss=0.0, logit_softcap=None, reduction="mean",
    classifier_layout="vd", token_chunk=None, vocab_chunk=None, accumulation_dtype=jnp.float32,
    vocab_mask=None, gradient_filter=None,
) -> LinearCall:  # fmt: skip
    """Checks a fused cross-entropy's arguments (see :func:`~jaxsoftmax.linear_cross_entropy`)."""
    layout = linear_head.check_layout(classifier_layout)
    head, batch = linear_head.check_linear_head(hidden, classifier, bias, layout)
    labels = linear_head.check_token_labels(
        labels, batch, hint=" Probability targets would be an N x V array."
    )
    row_mask = linear_head.check_token_mask(
        where, batch, hint=" (A per-class mask would be an N x V array.)"
    )
    num_classes = linear_head.num_classes(head, layout)
    options, class_weights = check_options(
        ignore_index=ignore_index, label_smoothing=label_smoothing, class_weights=class_weights,
        z_loss=z_loss, logit_softcap=logit_softcap, reduction=reduction, num_classes=num_classes,
    )  # fmt: skip
    tiles = linear_head.check_tile_options(
        layout, token_chunk, vocab_chunk, accumulation_dtype, gradient_filter, head.hidden.dtype
    )
    vocab_mask = check_vocab_mask(vocab_mask, num_classes)
    row_mask = merged_row_mask(row_mask, labels, options.ignore_index)
    if vocab_mask is not None:  # a label on a class that does not exist is a bad label
        labels = labels_on_masked_classes_out_of_range(labels, vocab_mask, options.ignore_index)
    return LinearCall(
        head, labels, class_weights, row_mask, vocab_mask, batch, num_classes, options, tiles
    )

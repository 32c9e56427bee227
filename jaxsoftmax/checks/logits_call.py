"""A loss call on given logits, checked into one value.

:func:`check_logits_call` checks what :func:`~jaxsoftmax.cross_entropy`, the optax drop-ins
and :func:`~jaxsoftmax.sharded_cross_entropy` take (the logits and their class axes, the
targets, ``where``, the loss options, the vocabulary mask, checked mode's labels) and
returns one :class:`LogitsCall`: the arrays, and :class:`LogitsSettings`, the static part
the compiled computation is specialised on. Nothing below the public functions checks again.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsoftmax.checks import arrays, checked_mode
from jaxsoftmax.checks.options import LossOptions, check_options, check_vocab_mask

LABEL_HINT = " Leave an example out with ignore_index= or where=."


@dataclasses.dataclass(frozen=True)
class LogitsSettings:
    """The static part of a checked call: the class axes, integer or probability targets,
    the loss options, and checked mode's deferred label check (``(name, hint)`` to stage a
    checkify check for traced labels, else None)."""

    axes: tuple
    integer: bool
    options: LossOptions
    label_check: tuple | None = None

    def without_reduction(self) -> LogitsSettings:
        """These settings for the per-example losses, which do not depend on the reduction:
        one compiled program then serves every reduction."""
        return dataclasses.replace(
            self, options=dataclasses.replace(self.options, reduction="none")
        )


class LogitsCall(NamedTuple):
    """A checked call: the arrays (masks and weights None when not given) and its settings."""

    logits: jax.Array
    targets: jax.Array
    row_mask: jax.Array | None
    class_mask: jax.Array | None
    class_weights: jax.Array | None
    vocab_mask: jax.Array | None
    settings: LogitsSettings

    @property
    def num_classes(self) -> int:
        return arrays.check_num_classes(self.logits.shape, self.settings.axes)


def check_targets(targets, logits, axes, *, kind, name, hint):
    """``(targets, integer)``: integer labels or probabilities (``kind`` None: by dtype)."""
    targets = arrays.as_array(targets, name)
    arrays.check_not_bool(targets, logits.shape, axes, name=name, kind=kind)
    if kind is None:
        kind = "indices" if jnp.issubdtype(targets.dtype, jnp.integer) else "probabilities"
    if kind == "indices":
        return arrays.check_integer_labels(targets, logits.shape, axes, name=name, hint=hint), True
    return arrays.check_probability_labels(targets, logits.shape, name=name, hint=hint), False


def check_logits_call(
    logits, targets, *, axis=-1, where=None, ignore_index=None, label_smoothing=0.0,
    class_weights=None, z_loss=0.0, logit_softcap=None, reduction="mean", checked=False,
    sharded=False, allow_none_axis=False, targets_kind=None, targets_name="targets",
    kind_hint="", label_hint=LABEL_HINT, vocab_mask=None,
) -> LogitsCall:  # fmt: skip
    """Checks a loss call on logits (see :func:`~jaxsoftmax.cross_entropy`).

    ``targets_kind`` is ``"indices"``, ``"probabilities"`` or None to decide by dtype;
    ``targets_name``, ``kind_hint`` and ``label_hint`` (checked mode: how to leave an
    example out) word the messages. With ``sharded`` (the class axis split over a mapped
    axis, whose size is unknown here) checked mode defers its range check to the traced
    computation, where the whole ``V`` is known.
    """
    logits = arrays.check_logits(logits)
    axes = arrays.class_axes(axis, logits.ndim, allow_none=allow_none_axis)
    num_classes = arrays.check_num_classes(logits.shape, axes)
    targets, integer = check_targets(
        targets, logits, axes, kind=targets_kind, name=targets_name, hint=kind_hint
    )
    row_mask, class_mask = arrays.check_where(where, logits.shape, axes)
    options, class_weights = check_options(
        ignore_index=ignore_index, label_smoothing=label_smoothing, class_weights=class_weights,
        z_loss=z_loss, logit_softcap=logit_softcap, reduction=reduction,
        num_classes=num_classes, integer_targets=integer,
    )  # fmt: skip
    vocab_mask = check_vocab_mask(vocab_mask, num_classes)
    label_check = None
    if checked and integer:
        # Labels known in Python are checked here, before any computation; traced labels
        # get a checkify check inside the computation, which needs `jaxsoftmax.checked`.
        defer = checked_mode.check_labels_or_defer(
            targets, None if sharded else num_classes, row_mask, name=targets_name,
            ignore_index=options.ignore_index, hint=label_hint, vocab_mask=vocab_mask,
        )  # fmt: skip
        label_check = (targets_name, label_hint) if defer else None
    settings = LogitsSettings(axes, integer, options, label_check)
    return LogitsCall(logits, targets, row_mask, class_mask, class_weights, vocab_mask, settings)

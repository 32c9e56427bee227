"""Argument checks and the class-axis layout shared by the public losses.

Every check here runs on shapes, dtypes and Python values only, so it raises before any
computation and works the same under ``jit``, ``vmap`` and ``shard_map``. Values that
only exist at run time (an integer label out of range) cannot raise under ``jit``: the
rule turns them into NaN, and :mod:`jaxsoftmax.checks.checked_mode` offers a checked mode.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Axis = int | Sequence[int]

REDUCTIONS = ("mean", "sum", "none")


def describe(x) -> str:
    return f"{jnp.dtype(x.dtype).name} array of shape {tuple(x.shape)}"


def as_array(x, name: str):
    """``x`` as an array, or a TypeError naming ``name`` when it is not array-like."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    if isinstance(x, (bool, int, float, list, tuple)):
        return jnp.asarray(x)
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # tracers, duck arrays
        return x
    raise TypeError(f"{name} must be an array; got {type(x).__name__}.")


def check_logits(logits):
    logits = as_array(logits, "logits")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"logits must be a floating-point array (float16, bfloat16, float32 or float64); "
            f"got {describe(logits)}. Cast it, e.g. logits.astype(jnp.float32)."
        )
    if logits.ndim == 0:
        raise ValueError("logits must have at least one axis (the class axis); got a scalar.")
    return logits


def class_axes(axis, ndim: int, *, allow_none: bool = False) -> tuple[int, ...]:
    """Normalize ``axis`` (an int, a tuple of ints, or None for all) to non-negative axes."""
    if axis is None:
        if allow_none:
            return tuple(range(ndim))
        raise TypeError("axis must be an int or a tuple of ints; got None.")
    if isinstance(axis, (list, tuple)):
        axes = tuple(axis)
    else:
        axes = (axis,)
    if not axes:
        raise ValueError("axis must name at least one class axis; got an empty tuple.")
    normalized = []
    for a in axes:
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(
                f"axis must be an int or a tuple of ints; got {axis!r} "
                f"(an element of type {type(a).__name__})."
            ) from None
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a} is out of range for logits with {ndim} dimension(s); expected an "
                f"axis in [{-ndim}, {ndim - 1}]."
            )
        normalized.append(a % ndim)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"axis {axis!r} names the same axis twice.")
    return tuple(normalized)


def check_num_classes(logits_shape, axes: tuple[int, ...]) -> int:
    """The number of classes (the product of the class axes' sizes); at least one."""
    num_classes = math.prod(logits_shape[a] for a in axes)
    if num_classes == 0:
        which = (
            f"class axis {axes[0]} has size 0"
            if len(axes) == 1
            else f"class axes {axes} hold 0 classes"
        )
        raise ValueError(
            f"logits must have at least one class; got logits of shape {tuple(logits_shape)}, "
            f"whose {which}. Expected a class axis of size >= 1 (check the axis argument and "
            "the logits' shape)."
        )
    return num_classes


def check_not_bool(targets, logits_shape, axes, *, name="targets", kind=None):
    """A TypeError for boolean targets, which are neither class indices nor probabilities.

    ``kind`` is ``"indices"``, ``"probabilities"`` or None (either), for the message.
    """
    if targets.dtype != jnp.bool_:
        return
    rows = batch_shape(logits_shape, axes)
    indices = f"integer class indices of shape {rows}"
    probabilities = f"float probabilities of shape {tuple(logits_shape)}"
    expected = {"indices": indices, "probabilities": probabilities}.get(
        kind, f"{indices} or {probabilities}"
    )
    if tuple(targets.shape) == tuple(logits_shape):
        fix = f"A one-hot mask? Use {name}.astype(jnp.float32) as probabilities."
    elif tuple(targets.shape) == rows:
        fix = f"Class indices 0 and 1? Use {name}.astype(jnp.int32)."
    else:
        fix = "Cast them to the kind of target you mean."
    raise TypeError(
        f"{name} must be {expected}; got {describe(targets)}: booleans are neither class "
        f"indices nor probabilities. {fix}"
    )


def batch_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in axes)


def move_classes_last(x, axes: tuple[int, ...]):
    """Transpose ``x`` to ``batch axes + class axes`` and flatten the class axes into one.

    The flat class index is the row-major index into the class axes in the order given,
    as in optax's ``softmax_cross_entropy_with_integer_labels``.
    """
    batch = batch_axes(axes, x.ndim)
    if axes != tuple(range(x.ndim - len(axes), x.ndim)) or len(axes) > 1:
        x = jnp.transpose(x, batch + axes)
    num_classes = math.prod(x.shape[len(batch) :])
    return x.reshape(x.shape[: len(batch)] + (num_classes,))


def batch_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in batch_axes(axes, len(shape)))


def check_integer_labels(labels, logits_shape, axes, *, name="labels", hint=""):
    labels = as_array(labels, name)
    expected = batch_shape(logits_shape, axes)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        if jnp.issubdtype(labels.dtype, jnp.floating) and tuple(labels.shape) == tuple(
            logits_shape
        ):
            raise TypeError(
                f"{name} must be integer class indices of shape {expected}; got {describe(labels)}, "
                f"which looks like probabilities.{hint}"
            )
        raise TypeError(
            f"{name} must be integer class indices of shape {expected}; got {describe(labels)}."
            " Cast indices with labels.astype(jnp.int32)."
        )
    if tuple(labels.shape) != expected:
        extra = ""
        if tuple(labels.shape) == tuple(logits_shape):
            extra = " (one-hot integers? pass them as floats to use them as probabilities)"
        raise ValueError(
            f"{name} must have the logits' shape without the class axis, {expected}; got "
            f"{describe(labels)}{extra}. Nothing is broadcast."
        )
    return labels


def check_probability_labels(labels, logits_shape, *, name="labels", hint=""):
    labels = as_array(labels, name)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be float probabilities of shape {tuple(logits_shape)}; got "
            f"{describe(labels)}, which looks like integer class indices.{hint}"
        )
    if tuple(labels.shape) != tuple(logits_shape):
        raise ValueError(
            f"{name} must have the logits' shape {tuple(logits_shape)}; got {describe(labels)}. "
            "Nothing is broadcast."
        )
    return labels


def check_where(where, logits_shape, axes):
    """``where`` as (row_mask or None, class_mask or None) in the logits' original layout."""
    if where is None:
        return None, None
    where = as_array(where, "where")
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean array; got {describe(where)}.")
    rows = batch_shape(logits_shape, axes)
    if tuple(where.shape) == tuple(logits_shape):
        return None, where
    if tuple(where.shape) == rows:
        return where, None
    raise ValueError(
        f"where must have the shape of one example per row, {rows}, or of the logits, "
        f"{tuple(logits_shape)}; got {describe(where)}. Nothing is broadcast."
    )


def check_number(value, name: str, *, low=None, high=None, low_open=False, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{name} must be a Python float; got {type(value).__name__} {value!r}. "
            "It is a static option of the rule, so a traced value cannot be used."
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}.")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(
            f"{name} must be {bound}"
            + (f" and <= {high}" if high is not None else "")
            + f"; got {value}."
        )
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}; got {value}.")
    return value


def check_class_weights(class_weights, num_classes: int):
    if class_weights is None:
        return None
    class_weights = as_array(class_weights, "class_weights")
    if not jnp.issubdtype(class_weights.dtype, jnp.floating):
        raise TypeError(
            f"class_weights must be a float array of shape ({num_classes},); got "
            f"{describe(class_weights)}."
        )
    if tuple(class_weights.shape) != (num_classes,):
        raise ValueError(
            f"class_weights must have one weight per class, shape ({num_classes},); got "
            f"{describe(class_weights)}."
        )
    return jax.lax.stop_gradient(class_weights)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
    return reduction


# The PyTorch-style losses' default ignore_index: PyTorch's, the label its users pad with.
DEFAULT_IGNORE_INDEX = -100


def check_ignore_index(ignore_index: int | None, integer_targets: bool):
    """``ignore_index`` as an int or None; the default (``-100``) is None for probability
    targets, as PyTorch ignores it there, and any other value raises for them."""
    if ignore_index is None or (ignore_index == DEFAULT_IGNORE_INDEX and not integer_targets):
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}.")
    if not integer_targets:
        raise ValueError(
            "ignore_index applies to integer class-index targets only (as in PyTorch); got "
            "probability targets. Use where= to drop examples with probability targets."
        )
    return int(ignore_index)


def check_flag(value, name: str) -> bool:
    """A Python bool option (static: it decides what the loss returns)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}.")
    return bool(value)

"""The linear head of the fused losses, checked once: hidden states, classifier and bias.

Every fused loss (:func:`~jaxsoftmax.linear_cross_entropy`, the distillation losses' student
and teacher, their sharded forms) takes a model's last layer as ``hidden [..., d]``, a
``classifier`` of layout ``"vd"`` (``[V, d]``, a tied embedding table) or ``"dv"``
(``[d, V]``, a Dense kernel) and an optional ``bias [V]``, and the tokens' labels and mask
``[...]``. :func:`check_linear_head` checks a head and returns one :class:`LinearHead` with
the tokens flattened to ``[N, d]``; :func:`check_token_labels` and :func:`check_token_mask`
check the per-token arrays against it; :func:`check_tile_options` the tiling choices, which
travel as one :class:`TileOptions`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsoftmax.checks import arrays

LAYOUTS = ("vd", "dv")


class LinearHead(NamedTuple):
    """One model's last layer, checked: ``hidden [N, d]`` (tokens flattened), ``classifier``
    (``[V, d]`` or ``[d, V]``) and ``bias [V]`` or None."""

    hidden: jax.Array
    classifier: jax.Array
    bias: jax.Array | None


@dataclasses.dataclass(frozen=True)
class TileOptions:
    """How a fused loss tiles the logits (static, checked): the classifier's layout, the tile
    ``token_chunk x vocab_chunk`` (None: each backend's), the dtype the classifier's gradient
    is summed in, and the opt-in gradient filter's ``eps`` (None: exact)."""

    layout: str = "vd"
    token_chunk: int | None = None
    vocab_chunk: int | None = None
    accumulation_dtype: jnp.dtype = jnp.dtype(jnp.float32)
    gradient_filter: float | None = None


def check_float(x, name: str):
    """``x`` as a floating-point array, else a TypeError naming ``name``."""
    x = arrays.as_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got {arrays.describe(x)}.")
    return x


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(
            f"classifier_layout must be one of {LAYOUTS} ([V, d] or [d, V]); got {layout!r}."
        )
    return layout


def num_classes(head: LinearHead, layout: str) -> int:
    """``V``: the classifier's vocabulary axis."""
    return head.classifier.shape[0 if layout == "vd" else 1]


def check_linear_head(hidden, classifier, bias, layout: str, *, prefix: str = ""):
    """``(LinearHead, batch)``: ``(hidden, classifier, bias)`` checked for ``layout``, the
    tokens flattened, and their shape ``batch`` (``hidden``'s without ``d``).

    ``prefix`` names the model in messages (``"student_"``: ``student_hidden``, ...).
    """
    hidden = check_float(hidden, f"{prefix}hidden")
    classifier = check_float(classifier, f"{prefix}classifier")
    if hidden.ndim < 1:
        raise ValueError(f"{prefix}hidden must have a feature axis, shape [..., d]; got a scalar.")
    width = hidden.shape[-1]
    feature_axis = 1 if layout == "vd" else 0
    if classifier.ndim != 2 or classifier.shape[feature_axis] != width:
        expected = "[V, d]" if layout == "vd" else "[d, V]"
        hint = ""
        if classifier.ndim == 2 and classifier.shape[1 - feature_axis] == width:
            hint = f" It looks transposed: pass classifier_layout={LAYOUTS[feature_axis]!r}."
        raise ValueError(
            f"{prefix}classifier must have shape {expected} with d = {width} ({prefix}hidden's "
            f"last axis) for classifier_layout={layout!r}; got "
            f"{arrays.describe(classifier)}.{hint}"
        )
    if classifier.dtype != hidden.dtype:
        raise TypeError(
            f"{prefix}classifier must have {prefix}hidden's dtype "
            f"{jnp.dtype(hidden.dtype).name}; got {arrays.describe(classifier)}. Cast one of them."
        )
    vocabulary = classifier.shape[1 - feature_axis]
    if bias is not None:
        bias = check_float(bias, f"{prefix}bias")
        if tuple(bias.shape) != (vocabulary,):
            raise ValueError(
                f"{prefix}bias must have one entry per class, shape ({vocabulary},); got "
                f"{arrays.describe(bias)}."
            )
    batch = tuple(hidden.shape[:-1])
    return LinearHead(hidden.reshape(math.prod(batch), width), classifier, bias), batch


def check_token_labels(labels, batch: tuple, *, hint: str = ""):
    """Integer ``labels`` of the tokens' shape ``batch``, flattened to ``[N]``."""
    labels = arrays.as_array(labels, "labels")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices of shape {batch}; got "
            f"{arrays.describe(labels)}.{hint}"
        )
    if tuple(labels.shape) != batch:
        raise ValueError(
            f"labels must have hidden's shape without the feature axis, {batch}; "
            f"got {arrays.describe(labels)}. Nothing is broadcast."
        )
    return labels.reshape(math.prod(batch))


def check_token_mask(where, batch: tuple, *, hint: str):
    """``where`` as a bool ``[N]`` (one entry per token), or None."""
    if where is None:
        return None
    where = arrays.as_array(where, "where")
    if where.dtype != jnp.bool_ or tuple(where.shape) != batch:
        raise ValueError(
            f"where must be a boolean array of one entry per example, shape {batch}; got "
            f"{arrays.describe(where)}.{hint}"
        )
    return where.reshape(math.prod(batch))


def check_chunk(value, name: str):
    if value is None:
        return None
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a positive int or None (automatic); got "
            f"{type(value).__name__} {value!r}."
        ) from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None (automatic); got {value}.")
    return value


def check_accumulation_dtype(accumulation_dtype) -> jnp.dtype:
    try:
        accumulation_dtype = jnp.dtype(accumulation_dtype)
    except TypeError:
        raise TypeError(
            f"accumulation_dtype must be a float dtype; got {accumulation_dtype!r}."
        ) from None
    if not jnp.issubdtype(accumulation_dtype, jnp.floating):
        raise TypeError(f"accumulation_dtype must be a float dtype; got {accumulation_dtype}.")
    return accumulation_dtype


def check_gradient_filter(value, dtype):
    """``gradient_filter`` as a positive float or None; ``"auto"`` is ``eps(dtype) / 32``."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f'gradient_filter must be None, a float > 0 or "auto"; got {value!r}.')
        return float(jnp.finfo(dtype).eps) / 32
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'gradient_filter must be None, a float > 0 or "auto"; got {value!r}.')
    return float(value)


def check_tile_options(layout, token_chunk, vocab_chunk, accumulation_dtype=jnp.float32,
                       gradient_filter=None, dtype=jnp.float32) -> TileOptions:  # fmt: skip
    """The tiling arguments as one :class:`TileOptions` (``dtype``: the inputs', for
    ``gradient_filter="auto"``)."""
    return TileOptions(
        layout=check_layout(layout),
        token_chunk=check_chunk(token_chunk, "token_chunk"),
        vocab_chunk=check_chunk(vocab_chunk, "vocab_chunk"),
        accumulation_dtype=check_accumulation_dtype(accumulation_dtype),
        gradient_filter=check_gradient_filter(gradient_filter, dtype),
    )

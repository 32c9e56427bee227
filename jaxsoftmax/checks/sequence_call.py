"""The arguments of the sequence functions, checked: which positions make which response.

:func:`check_sequence_call` checks :func:`~jaxsoftmax.sequence_log_probs`'s (the per-token
log-probabilities, and a mask or segment ids: :func:`check_responses`, shared with the fused
preference losses), :func:`check_pairs_layout` :func:`~jaxsoftmax.preference_pairs`' (a
:class:`~jaxsoftmax.SequenceLogProbs`, :func:`check_sequences`, and a layout its responses
pair up in). Shapes and dtypes raise under any transformation; a segment id out of
``0..num_segments`` raises where the ids are known in Python, and under ``jax.jit`` counts for
no response.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsoftmax.checks import arrays
from jaxsoftmax.core.sequence_sums import LAYOUTS, SequenceLogProbs


class SequenceCall(NamedTuple):
    """A :func:`~jaxsoftmax.sequence_log_probs` call, checked: ``values [B, L]`` and either
    ``mask [B, L]`` or ``segment_ids [B, L]`` with ``num_segments``."""

    values: jax.Array
    mask: jax.Array | None
    segment_ids: jax.Array | None
    num_segments: int | None


def is_known(*xs) -> bool:
    """Whether every array has a value in Python (not a tracer of jit, vmap, grad...)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


# --- sequence_log_probs -----------------------------------------------------------------


def check_sequence_call(token_log_probs, *, mask, segment_ids, num_segments) -> SequenceCall:
    """Checks :func:`~jaxsoftmax.sequence_log_probs`'s arguments (see there)."""
    values = arrays.as_array(token_log_probs, "token_log_probs")
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise TypeError(
            "token_log_probs must be a floating-point array (float16, bfloat16, float32 or "
            f"float64); got {arrays.describe(values)}."
        )
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(
            "token_log_probs must be [B, L]: one log-probability per position, B >= 1 rows of "
            f"L >= 1 positions; got {arrays.describe(values)}."
        )
    mask, segment_ids, num_segments = check_responses(
        mask, segment_ids, num_segments, tuple(values.shape), "token_log_probs'"
    )
    return SequenceCall(values, mask, segment_ids, num_segments)


def check_responses(mask, segment_ids, num_segments, shape: tuple, name: str):
    """``(mask, segment_ids, num_segments)``: exactly one way of saying which positions belong
    to which response, of the ``shape`` of ``name`` (possessive: ``"tokens'"``)."""
    if (mask is None) == (segment_ids is None):
        given = "both" if mask is not None else "neither"
        raise ValueError(
            f"pass exactly one of mask= (bool {shape}: one response per row) and segment_ids= "
            f"(integers {shape}: 0 for no response, 1..num_segments for a row's packed "
            f"responses); got {given}."
        )
    if mask is not None:
        return _mask(mask, num_segments, shape, name), None, None
    segment_ids = arrays.as_array(segment_ids, "segment_ids")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(
            f"segment_ids must be integers of shape {shape} (0 for no response, 1..num_segments"
            f" for a row's responses); got {arrays.describe(segment_ids)}."
        )
    if tuple(segment_ids.shape) != shape:
        raise ValueError(
            f"segment_ids must have {name} shape {shape}; got "
            f"{arrays.describe(segment_ids)}. Nothing is broadcast."
        )
    num_segments = _num_segments(num_segments)
    if is_known(segment_ids):
        ids = np.asarray(segment_ids)
        bad = (ids < 0) | (ids > num_segments)
        if bad.any():
            position = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"segment_ids must be in 0..num_segments = 0..{num_segments}; got {ids[position]}"
                f" at position {position}. (Under jax.jit this cannot be checked: such a "
                "position counts for no response.)"
            )
    return None, segment_ids, num_segments


def _mask(mask, num_segments, shape: tuple, name: str):
    """A bool mask of ``shape``: one response per row."""
    if num_segments is not None:
        raise ValueError(
            f"num_segments={num_segments!r} applies to segment_ids= only; with mask= each "
            "row is one response."
        )
    mask = arrays.as_array(mask, "mask")
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be a boolean array of shape {shape} (True on each response's "
            f"tokens); got {arrays.describe(mask)}. Cast a 0/1 mask with mask.astype(bool)."
        )
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"mask must have {name} shape {shape}; got {arrays.describe(mask)}. "
            "Nothing is broadcast."
        )
    return mask


def _num_segments(num_segments) -> int:
    if num_segments is None:
        raise ValueError(
            "segment_ids= needs num_segments=: the most responses a row holds, a Python int "
            "(static: it is the output's shape [B, num_segments])."
        )
    if isinstance(num_segments, bool):
        raise TypeError(f"num_segments must be an int; got {num_segments!r}.")
    try:
        num_segments = operator.index(num_segments)
    except TypeError:
        raise TypeError(
            f"num_segments must be an int; got {type(num_segments).__name__} {num_segments!r}."
        ) from None
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1; got {num_segments}.")
    return num_segments


# --- preference_pairs --------------------------------------------------------------------


def check_layout_name(layout) -> str:
    if isinstance(layout, str) and layout in LAYOUTS:
        return layout
    raise ValueError(
        f"layout must be one of {LAYOUTS}; got {layout!r}. 'interleaved': the responses, "
        "flattened row-major, alternate (chosen, rejected, chosen, ...); 'halves': the first "
        "half of them are the chosen, the second half the rejected, in the same order (TRL's "
        "concatenated batch)."
    )


def check_pairs_layout(sequences, layout) -> tuple[SequenceLogProbs, str]:
    """``(sequences, layout)`` checked: the responses' log-probabilities pair up in
    ``layout``."""
    sequences = check_sequences(sequences, "sequences")
    layout = check_layout_name(layout)
    check_pairable(tuple(sequences.total.shape), layout, "sequences")
    return sequences, layout


def check_pairable(shape: tuple, layout: str, name: str) -> int:
    """The number of pairs ``P`` of responses of ``shape`` in ``layout``, else a ValueError."""
    responses = int(np.prod(shape))
    if responses % 2:
        raise ValueError(
            f"{name} holds {responses} responses (shape {shape}), an odd number: chosen and "
            "rejected responses come in pairs."
        )
    if layout == "interleaved" and len(shape) == 2 and shape[1] % 2:
        raise ValueError(
            f"{name} has shape {shape}: with layout='interleaved' the packed responses of a row "
            "pair up as segments (1, 2), (3, 4), ..., so num_segments must be even; got "
            f"{shape[1]}. Pass an even num_segments (a pair of empty segments is padding)."
        )
    return responses // 2


def check_sequences(x, name: str) -> SequenceLogProbs:
    """A :class:`SequenceLogProbs` of a float ``total`` and an integer ``count`` of one shape."""
    if not isinstance(x, SequenceLogProbs):
        raise TypeError(
            f"{name} must be a SequenceLogProbs (total, count), as sequence_log_probs and "
            f"preference_pairs return; got {type(x).__name__}."
        )
    total = arrays.as_array(x.total, f"{name}.total")
    count = arrays.as_array(x.count, f"{name}.count")
    if not jnp.issubdtype(total.dtype, jnp.floating):
        raise TypeError(
            f"{name}.total must be a floating-point array; got {arrays.describe(total)}."
        )
    if not jnp.issubdtype(count.dtype, jnp.integer):
        raise TypeError(
            f"{name}.count must be an integer array (the responses' numbers of tokens); got "
            f"{arrays.describe(count)}."
        )
    if tuple(count.shape) != tuple(total.shape):
        raise ValueError(
            f"{name}.count must have {name}.total's shape {tuple(total.shape)}; got "
            f"{arrays.describe(count)}."
        )
    return SequenceLogProbs(total, count)


def response_counts(mask, segment_ids, num_segments):
    """Each response's number of tokens, in NumPy: ``[B]`` or ``[B, S]``."""
    if mask is not None:
        return np.asarray(mask).sum(-1)
    ids = np.asarray(segment_ids)
    return (ids[:, :, None] == np.arange(1, num_segments + 1)).sum(1)


def numpy_pairs(counts, layout: str):
    """``(chosen, rejected)`` of NumPy counts in ``layout``, as
    :func:`jaxsoftmax.core.sequence_sums.pairs` pairs the arrays."""
    flat = counts.reshape(-1)
    if layout == "interleaved":
        return flat[0::2], flat[1::2]
    return flat[: flat.size // 2], flat[flat.size // 2 :]

"""The token log-probabilities' arguments, checked into one value.

:func:`jaxsoftmax.token_log_probs` and its fused and sharded forms score integer ``tokens``
(one per position, any leading shape) under a temperature, optionally masked by ``where``.
These checks run on shapes, dtypes and Python values, before any computation. A token out of
``[0, V)`` is a value known only at run time: its log-probability is NaN (documented on each
function).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsoftmax.checks import arrays


class TokenCall(NamedTuple):
    """A checked call on logits: ``logits [..., V]``, ``tokens [...]``, ``row_mask [...]`` or
    None, and the temperature."""

    logits: jax.Array
    tokens: jax.Array
    row_mask: jax.Array | None
    temperature: float


def check_temperature(temperature) -> float:
    """A finite Python float > 0 (a static option: it is in the rule's derivative)."""
    return arrays.check_number(temperature, "temperature", low=0.0, low_open=True)


def check_tokens(tokens, positions: tuple, *, what: str):
    """Integer ``tokens`` of shape ``positions`` (``what`` names the array it must match)."""
    tokens = arrays.as_array(tokens, "tokens")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(
            f"tokens must be integer token ids of shape {positions}; got "
            f"{arrays.describe(tokens)}. Cast them with tokens.astype(jnp.int32)."
        )
    if tuple(tokens.shape) != positions:
        raise ValueError(
            f"tokens must have {what}, {positions}; got {arrays.describe(tokens)}. "
            "Nothing is broadcast."
        )
    return tokens


def check_positions_mask(where, positions: tuple):
    """``where``: a bool array with one entry per position, or None."""
    if where is None:
        return None
    where = arrays.as_array(where, "where")
    if where.dtype != jnp.bool_ or tuple(where.shape) != positions:
        raise ValueError(
            f"where must be a boolean array with one entry per token, shape {positions}; got "
            f"{arrays.describe(where)}. Nothing is broadcast."
        )
    return where


def check_token_call(logits, tokens, where, temperature) -> TokenCall:
    logits = arrays.check_logits(logits)
    positions = tuple(logits.shape[:-1])
    tokens = check_tokens(tokens, positions, what="the logits' shape without the class axis")
    return TokenCall(
        logits, tokens, check_positions_mask(where, positions), check_temperature(temperature)
    )

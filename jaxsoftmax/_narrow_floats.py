"""bf16 and f16 on XLA's CPU backend, which computes them in float32.

On a GPU or TPU the fused losses slice and multiply narrow floats as they are. XLA's CPU
backend has neither a bf16/f16 dynamic slice nor a bf16/f16 matrix product: it converts the
operands to float32. Left to itself it converts *whole* arrays, and hoists the conversion out
of the chunk loops, a float32 copy of the classifier (``4 V d`` bytes: 2.2 GiB at Gemma 2's
``V = 256000``, ``d = 2304``). These helpers make it convert one chunk at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def narrow_on_cpu(x) -> bool:
    """bf16/f16 on XLA's CPU backend, which computes those in float32 (see :func:`slice_chunk`)."""
    return jax.default_backend() == "cpu" and jnp.dtype(x.dtype).itemsize < 4


def slice_chunk(x, start, size, axis=0):
    """``x[start : start + size]`` along ``axis``, never converting the whole of ``x``.

    XLA's CPU backend has no bf16/f16 dynamic slice: it slices a float32 conversion of the
    whole operand, and as that conversion does not change from one loop iteration to the next
    it is hoisted out of the loop, a float32 copy of the classifier (``4 V d`` bytes, 2.2 GiB at
    Gemma's shape). Inside a ``lax.cond`` the conversion stays next to the slice, where it is
    fused into it: only the chunk is converted. The predicate is always true (chunk starts are
    never negative); the other branch exists only to give the conditional two branches. Other
    backends slice narrow floats natively and get the plain slice.
    """
    take = functools.partial(lax.dynamic_slice_in_dim, slice_size=size, axis=axis)
    if not narrow_on_cpu(x):
        return take(x, start)
    return lax.cond(start >= 0, lambda x: take(x, start), lambda x: take(x, 0), x)


def operand(chunk):
    """A chunk about to enter a matrix product: on the CPU, bf16/f16 is upcast to float32
    (XLA's CPU backend multiplies those in float32). Other backends keep the inputs' dtype
    (tensor cores)."""
    return chunk.astype(jnp.float32) if narrow_on_cpu(chunk) else chunk

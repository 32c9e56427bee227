"""The chunk of an array that one step of the fused loss's loops reads, per platform.

``x[start : start + size]`` along ``axis``, a ``lax.dynamic_slice``: the plain program, what a
GPU gets. Two backends hoist a conversion of the whole array out of the chunk loops unless
the slice is written for them, so :func:`slice_chunk` and :func:`operand_chunk` choose, when
the program is lowered:

* the CPU, for bf16 and float16 arrays: the slice inside a ``lax.cond``
  (:func:`jaxsoftmax.core.cpu_programs.narrow_chunk_in_a_cond`, workaround 3 there);
* a TPU, for float32 operands of a product at the default matmul precision: the chunk
  rounded to bf16's precision in the loop
  (:func:`jaxsoftmax.core.tpu_programs.rounded_like_the_product`).

The TPU's rounding is for the chunks of the products' operands (:func:`operand_chunk`: the
hidden states' and the classifier's, read by nothing but matrix products, which round them
the same way); a chunk of an accumulated sum is read with :func:`slice_chunk`, unrounded.
"""

from __future__ import annotations

import functools

from jax import lax

from jaxsoftmax.core import cpu_programs, tpu_programs


def slice_chunk(x, start, size, axis=0):
    """``x[start : start + size]`` along ``axis``, never converting all of ``x`` on the CPU."""
    return _chunk(x, start, size, axis, operand=False)


def operand_chunk(x, start, size, axis=0):
    """:func:`slice_chunk` of a matrix product's operand (a chunk of the hidden states or of
    the classifier, read by products only): on a TPU a float32 chunk is also rounded as the
    product rounds it, inside the loop."""
    return _chunk(x, start, size, axis, operand=True)


def _chunk(x, start, size, axis, operand):
    take = functools.partial(lax.dynamic_slice_in_dim, slice_size=size, axis=axis)
    programs = {}
    on_the_cpu = cpu_programs.narrow_chunk_in_a_cond(take, x)
    if on_the_cpu is not None:
        programs["cpu"] = on_the_cpu
    if operand and tpu_programs.products_round_to_bfloat16(x.dtype):
        programs["tpu"] = tpu_programs.rounded_like_the_product(take)
    return cpu_programs.per_platforms(take, **programs)(x, start)

"""The chunk of an array that one step of the fused loss's loops reads, per platform.

``x[start : start + size]`` along ``axis``, a ``lax.dynamic_slice``: the plain program, what a
GPU gets. Two backends hoist a conversion of the whole array out of the chunk loops unless
the slice is written for them, so :func:`slice_chunk` chooses, when the program is lowered:

* the CPU, for bf16 and float16 arrays: the slice inside a ``lax.cond``
  (:func:`jaxsoftmax.core.cpu_programs.narrow_chunk_in_a_cond`, workaround 3 there);
* a TPU, for float32 arrays at the default matmul precision: the chunk rounded to bf16's
  precision in the loop (:func:`jaxsoftmax.core.tpu_programs.rounded_like_the_product`).

Every chunk a tile slices is an operand of its matrix products and nothing else, which is
what makes the TPU's rounding exact (the product rounds it the same way).
"""

from __future__ import annotations

import functools

from jax import lax

from jaxsoftmax.core import cpu_programs, tpu_programs


def slice_chunk(x, start, size, axis=0):
    """``x[start : start + size]`` along ``axis``, never converting all of ``x`` on any
    platform; ``x`` is a matrix-product operand (a classifier or hidden-state chunk)."""
    take = functools.partial(lax.dynamic_slice_in_dim, slice_size=size, axis=axis)
    programs = {}
    on_the_cpu = cpu_programs.narrow_chunk_in_a_cond(take, x)
    if on_the_cpu is not None:
        programs["cpu"] = on_the_cpu
    if tpu_programs.products_round_to_bfloat16(x.dtype):
        programs["tpu"] = tpu_programs.rounded_like_the_product(take)
    return cpu_programs.per_platforms(take, **programs)(x, start)

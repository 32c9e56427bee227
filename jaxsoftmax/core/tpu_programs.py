"""What the fused loss's chunks become on XLA's TPU backend; equal values, less memory.

The tiles of :mod:`jaxsoftmax.tiles` slice one chunk of the classifier (and of the hidden
states) per loop step and multiply it. On a TPU a float32 product at the default precision
runs as one bfloat16 pass: each operand is rounded to bfloat16 on its way in. XLA:TPU writes
that rounding as a ``convert`` to bf16, moves it above the slice (a narrowing conversion
before a data movement reads fewer bytes) and then out of the chunk loops (it no longer
depends on the step). Without this module a TPU program of the fused loss in float32 holds a
bf16 copy of the whole classifier, and of the whole hidden states, for the whole loss:
1,161 MiB of temporary memory at Gemma 2's shape (N 8192, d 2304, V 256000), 0.5 MiB with it
(libtpu 0.0.42.1, JAX 0.10.2, TPU v5e; compiled ahead of time for a topology without
devices, ``jax.experimental.topologies.get_topology_desc``).

The workaround (:func:`rounded_like_the_product`): round the sliced chunk to bfloat16's
precision in float32 (``lax.reduce_precision`` to 8 exponent and 7 mantissa bits, the
rounding the product would apply) inside the loop. It is an arithmetic operation, which the
compiler does not move above the slice, so the conversion stays in the loop, one chunk at a
time; the product then converts values that are already bf16 numbers, exactly. The values
are the ones the TPU computed before. It applies only to float32 chunks under the default
matmul precision: with ``jax.default_matmul_precision("float32")`` (or ``"highest"``) the
TPU multiplies in float32 and nothing is rounded.

Chosen when the program is lowered (:func:`jaxsoftmax.core.chunks.operand_chunk`, with
``jax.lax.platform_dependent``): a program lowered for a GPU or the CPU never contains it.
Pinned by ``test_float32_chunks_are_rounded_inside_the_loops_only_for_the_tpu`` (which reads
the exported TPU program) and ``test_the_tpu_program_multiplies_rounded_operands_and_sums_
unrounded`` (which runs it on the CPU), in tests/test_tpu_programs.py. Can go when XLA:TPU keeps
a narrowing conversion of a loop-variant slice inside its loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Values of jax_default_matmul_precision under which a TPU multiplies float32 in one bf16 pass.
_ONE_BFLOAT16_PASS = (None, "default", "bfloat16", "fastest")


def products_round_to_bfloat16(dtype) -> bool:
    """Whether a TPU multiplies ``dtype`` chunks as bf16 numbers: float32 at the default
    matmul precision (read when the program is traced, as ``lax.dot_general`` reads it)."""
    precision = jax.config.jax_default_matmul_precision
    precision = precision.lower() if isinstance(precision, str) else precision
    return jnp.dtype(dtype) == jnp.float32 and precision in _ONE_BFLOAT16_PASS


def rounded_like_the_product(take):
    """``take`` (a chunk slicer ``(x, start) -> chunk``) whose float32 chunk is rounded to
    bfloat16's precision, in float32, inside the loop that slices it."""

    def rounded(x, start):
        return lax.reduce_precision(take(x, start), exponent_bits=8, mantissa_bits=7)

    return rounded

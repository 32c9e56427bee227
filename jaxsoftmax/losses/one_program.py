"""``one_program``: a loss's work after its checks, compiled as one program.

A public loss checks its arguments in Python first (shapes, dtypes, option values: the
errors come before any computation), then computes. Run eagerly, that computation would be
one small XLA program per operation, each compiled on its first use of a shape: about
twenty compilations for one call of the fused loss, and as many again for its gradient.
``one_program`` compiles it whole instead. The checked call's arrays (``jax.Array``,
``np.ndarray``, or the tracers of an enclosing transformation) are the program's arguments;
every other leaf of the arguments (options, shapes, the tile plan) is static, part of the
program's identity. So

* an eager call runs one program, compiled once per shapes and static settings and then
  reused, and an eager ``jax.grad`` or ``jax.vjp`` of it runs one for the forward and one
  for the backward;
* inside the caller's own ``jax.jit`` the program is a nested call that XLA inlines: the
  caller's compiled program is the one it would be without it (``experiments/
  program_fingerprints.py`` compares them).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

_ARRAY = object()  # marks an argument leaf that is an array, in the static leaves


def one_program(compute):
    """``compute(*args)`` jitted with its array leaves as arguments and the rest static.

    The static leaves must be hashable (ints, strings, frozen dataclasses, tuples of them):
    a new value compiles a new program, as a ``static_argnames`` argument of ``jax.jit`` does.
    The program takes ``compute``'s name (``jit(_linear_cross_entropy)`` in a profile).
    """

    @functools.wraps(compute)
    def rebuilt(structure, static_leaves, array_leaves):
        arrays = iter(array_leaves)
        leaves = [next(arrays) if leaf is _ARRAY else leaf for leaf in static_leaves]
        return compute(*jax.tree.unflatten(structure, leaves))

    # The program takes compute's name, not its signature: jax.jit reads the signature of a
    # wrapped function, and compute's has no room for (structure, static_leaves) when it
    # takes one argument.
    del rebuilt.__wrapped__
    compiled = jax.jit(rebuilt, static_argnums=(0, 1), inline=True)

    @functools.wraps(compute)
    def run(*args):
        leaves, structure = jax.tree.flatten(args)
        is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
        array_leaves = [leaf for leaf, array in zip(leaves, is_array) if array]
        static_leaves = tuple(_ARRAY if array else leaf for leaf, array in zip(leaves, is_array))
        return compiled(structure, static_leaves, array_leaves)

    return run

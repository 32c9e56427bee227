"""The tile plan of the fused losses: which tile of logits is computed, and how.

The fused losses (:mod:`jaxsoftmax.tiles`) never hold the ``[N, V]`` logits ``z = h W^T + b``:
they visit ``[T, Vc]`` tiles, ``T`` tokens by ``Vc`` classes. A :class:`TilePlan` holds the
static choices of one call (the rule's options, the classifier's layout, the tile, each
backend's tile, what else to compute); the functions here compute a tile's logits and say
which of its classes count.

Ragged sizes: when ``Vc`` does not divide ``V`` the last chunk is moved back to end at ``V``
(:func:`chunk_starts`) and the classes an earlier chunk already visited are masked
(:func:`visited`); tokens likewise (:func:`visited_rows`). Nothing is padded or copied. When
the chunks tile ``N`` and ``V`` exactly there is no mask at all, and the loops
(:func:`over_chunks`) carry one chunk start per step.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jaxsoftmax.core import row_terms
from jaxsoftmax.core.chunks import operand_chunk


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Static choices of one call: the rule's options, the layout and the chunk sizes.

    ``token_chunk`` and ``vocab_chunk`` are the tile of the program being traced; ``tiles``
    holds each backend's (see :mod:`jaxsoftmax.tiles.sizes`), one of which is chosen when the
    program is lowered.
    """

    options: row_terms.RuleOptions
    layout: str
    token_chunk: int
    vocab_chunk: int
    accumulation_dtype: jnp.dtype
    num_classes: int | None = None  # all V real classes when sharded (None: the local V)
    tiles: tuple = ()  # ((platform, token_chunk, vocab_chunk, transposed), ...)
    transposed: bool = False  # computed on the classifier's transpose (tiles/tpu_layout.py)
    companions: bool = False  # also lse, entropy and correct per row (return_aux)
    gradient_filter: float | None = None  # skip the backward's negligible tiles (opt in)


def vocabulary(classifier, plan: TilePlan):
    """The local classes, all real classes, this shard's first class, and the rule's options.

    Without ``options.axis_name`` this shard is the whole vocabulary. With it (inside
    ``shard_map``) the classifier holds ``V_local`` rows of a vocabulary split over that axis,
    possibly padded at its end: the shard's classes start at ``axis_index * V_local`` and only
    classes below ``plan.num_classes`` are real. The rule is then called per tile with
    ``axis_name=None``: the tile's global offset goes in its :class:`row_terms.ClassBlock` and
    the per-row numbers it needs (``w[label]``, ``sum_c w_c``, ``V``) come from the global
    class weights every shard holds, so no tile communicates.
    """
    options = plan.options
    local = classifier.shape[0 if plan.layout == "vd" else 1]
    if options.axis_name is None:
        return local, local, 0, options
    offset = lax.axis_index(options.axis_name) * local
    return local, plan.num_classes or local, offset, dataclasses.replace(options, axis_name=None)


def visited(v0, i, vc, offset, num_classes, options, vocab_mask=None):
    """Classes of chunk ``i`` (starting at ``v0``) that count: not taken by an earlier chunk
    (a moved-back last chunk), on a padded vocabulary shard real, and kept by the
    ``vocab_mask`` (global, ``[V]``, or None); None when every class of every chunk counts
    (the chunks tile an unsharded vocabulary exactly and nothing is masked), so the tiles
    carry no mask at all (:func:`where_visited`)."""
    if options.axis_name is None and vocab_mask is None and num_classes % vc == 0:
        return None
    index = v0 + lax.broadcasted_iota(jnp.int32, (vc,), 0)
    fresh = index >= i * vc
    if options.axis_name is not None:
        fresh = fresh & (offset + index < num_classes)
    if vocab_mask is not None:
        fresh = fresh & lax.dynamic_slice_in_dim(vocab_mask, offset + v0, vc)
    return fresh


def where_visited(fresh, values, other):
    """``values`` (a ``[T, Vc]`` tile) where the class counts (:func:`visited`'s ``fresh``),
    ``other`` elsewhere; ``values`` itself when every class counts (``fresh`` None)."""
    return values if fresh is None else jnp.where(fresh[None, :], values, other)


def over_chunks(step, init, count: int):
    """``lax.scan`` of ``step(carry, i)`` over the chunks ``i = 0 .. count - 1``, with ``i``
    counted in the carry: ``(carry, stacked outputs)``.

    Scanning over ``jnp.arange(count)`` gives the same values, but XLA:TPU keeps that array
    of indices in main memory and copies it into its fast memory asynchronously, a copy and
    a loop-state slot of its own (one of the 16 KiB slots docs/performance.md counts).

    >>> total, doubled = over_chunks(lambda total, i: (total + i, 2 * i), jnp.int32(0), 4)
    >>> int(total), doubled.tolist()
    (6, [0, 2, 4, 6])
    """

    def counted(carry, _):
        inner, i = carry
        inner, out = step(inner, i)
        return (inner, i + 1), out

    (carry, _), outputs = lax.scan(counted, (init, jnp.int32(0)), None, length=count)
    return carry, outputs


def with_vocab_mask(class_weights, vocab_mask, num_classes, dtype):
    """``(w', K)``: the class weights with the masked classes' set to 0 (ones where there
    are none) and the number of classes that exist, over which label smoothing spreads;
    ``(class_weights, V)`` without a ``vocab_mask``."""
    if vocab_mask is None:
        return class_weights, num_classes
    weights = vocab_mask.astype(dtype)
    if class_weights is not None:
        weights = weights * class_weights.astype(dtype)
    return weights, jnp.sum(vocab_mask[:num_classes].astype(dtype))


def chunk_starts(total: int, chunk: int):
    """Number of chunks and the start of chunk ``i``: ``min(i * chunk, total - chunk)``, which
    is ``i * chunk`` when the chunks tile ``total`` exactly (written so: one number per step,
    not two, for the loops to keep).

    >>> count, start = chunk_starts(10, 4)  # the last chunk moved back to end at 10
    >>> count, [int(start(i)) for i in range(count)]
    (3, [0, 4, 6])
    """
    if total % chunk == 0:
        return total // chunk, lambda i: i * chunk
    return -(-total // chunk), lambda i: jnp.minimum(i * chunk, total - chunk)


def visited_rows(t0, j, chunk: int, total: int):
    """Rows of token chunk ``j`` (starting at ``t0``) that no earlier chunk took, ``[chunk]``
    bool: all but the first of a moved-back last chunk; None when the chunks tile ``total``
    exactly (every row of every chunk is its own).

    >>> visited_rows(6, 2, 4, 10).tolist()  # rows 6 and 7 were chunk 1's
    [False, False, True, True]
    >>> visited_rows(4, 1, 4, 8) is None
    True
    """
    if total % chunk == 0:
        return None
    return (t0 + lax.broadcasted_iota(jnp.int32, (chunk,), 0)) >= j * chunk


def classifier_chunk(classifier, start, width, layout):
    """The classifier's chunk of classes ``[start, start + width)``, a products' operand."""
    return operand_chunk(classifier, start, width, axis=0 if layout == "vd" else 1)


def tile_logits(hidden_t, classifier_c, bias_c, layout, dtype):
    """``h W^T + b`` for one tile, ``[T, Vc]`` in the compute dtype."""
    contract = 1 if layout == "vd" else 0
    z = lax.dot_general(
        hidden_t, classifier_c, (((1,), (contract,)), ((), ())), preferred_element_type=dtype
    )
    if bias_c is not None:
        z = z + bias_c.astype(dtype)[None, :]
    return z


def hidden_gradient(grad, classifier_c, layout, dtype):
    """``G W``: a tile's part of ``dL/dh``, ``[T, d]`` in ``dtype``, for the tile ``G`` of
    ``dL/dz`` against the classifier block it was computed from."""
    vocab_axis = 0 if layout == "vd" else 1
    return lax.dot_general(
        grad, classifier_c, (((1,), (vocab_axis,)), ((), ())), preferred_element_type=dtype
    )


def classifier_gradient(grad, hidden_t, layout, dtype):
    """A tile's part of ``dL/dW`` in ``dtype``: ``G^T h`` (``[Vc, d]``) for ``"vd"``, ``h^T G``
    (``[d, Vc]``) for ``"dv"``."""
    rows = (((0,), (0,)), ((), ()))
    if layout == "vd":
        return lax.dot_general(grad, hidden_t, rows, preferred_element_type=dtype)
    return lax.dot_general(hidden_t, grad, rows, preferred_element_type=dtype)

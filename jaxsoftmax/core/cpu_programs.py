"""Programs for XLA's CPU backend, equal to the plain ones in :mod:`jaxsoftmax.core.rule`.

The rule in :mod:`jaxsoftmax.core.rule` is written the way XLA on a GPU or TPU wants it: one
expression per quantity, left to the compiler to fuse. XLA's CPU backend fuses less, and
where it does not, it writes logits-sized temporaries that cost more time than the
arithmetic. The functions here compute the same values in a shape it handles well. Each
workaround says what XLA:CPU does without it, which test pins it and when it can go.

:func:`per_platform` chooses between the two when the program is *lowered*
(``jax.lax.platform_dependent``): a program lowered for the CPU gets these, one exported for
``"cuda"`` or ``"tpu"`` gets the plain rule, whatever machine traces it. The plain rule is
the oracle of these: ``tests/test_platforms.py`` checks that both agree on the CPU for every
option, target kind and dtype, forcing the plain path with :func:`plain_path_only`.

The workarounds, all for XLA:CPU (checked with jaxlib 0.10.2):

1. *Separate readers for narrow logits* (:func:`_separate_readers`, :func:`_shifted_again`,
   and a barrier on ``m`` in the backward). bf16 logits are widened to float32 inside each
   pass only when that pass is the widened array's one reader; with two readers XLA:CPU
   writes a float32 copy of the whole logits first (twice their bytes, two and a half times
   the time of both reductions at [4096, 32768]). Pinned by
   ``test_bf16_logits_are_widened_inside_the_passes_not_copied`` and
   ``test_bf16_probability_targets_are_widened_once_per_pass`` (tests/test_rule.py).
   Can go when XLA:CPU duplicates a cheap convert into each consumer fusion.
2. *The label entry by a scatter* (float32 and float64 integer labels, in
   :func:`logits_gradient`): comparing every class index with the label costs XLA:CPU as
   much as the exponential; writing the rule with the smoothing part alone, then one entry
   per row, does not. Pinned by ``test_compiled_loss_and_gradient_compute_one_exponential_
   per_logit``. Can go when XLA:CPU vectorizes the compare-and-select into the loop that
   computes the exponential.
3. *Narrow-float chunks of the fused loss* (:func:`narrow_chunk_in_a_cond`, chosen by
   :func:`jaxsoftmax.core.chunks.slice_chunk`): XLA:CPU has no bf16/f16
   dynamic slice. It slices a float32 conversion of the whole classifier and hoists that
   conversion out of the chunk loops, a float32 copy (``4 V d`` bytes, 2.2 GiB at Gemma 2's
   shape; the fused loss's temporary memory there goes from 150 MiB to 2.4 GiB without it).
   Pinned by ``test_compiled_temporary_memory_is_bounded_by_the_chunks``
   (tests/test_linear_cross_entropy.py). Can go when XLA:CPU slices narrow floats natively.
4. *A ``[d, V]`` classifier's gradient summed as ``[V, d]``* (:func:`rows_first_on_the_cpu`,
   for ``method="forward"``, :mod:`jaxsoftmax.tiles.forward_gradient`): XLA:CPU's product
   ``h^T G`` of a token block (``h [T, d]``, ``G [T, V]``) with a ``[d, V]`` result takes 1.4
   times as long as ``G^T h`` with a ``[V, d]`` one (113 against 80 ms at T 512, d 512, V
   32768, float32), so summing the blocks' ``G^T h`` and transposing the sum once is faster:
   ``value_and_grad`` of the loss at N 2048, d 512, V 32768 with a ``[d, V]`` classifier in
   0.88-0.91 of the naive path's time, against 1.02-1.03 with ``[d, V]`` products. Pinned by
   ``test_the_forward_method_sums_a_kernel_layout_gradient_in_rows_only_on_the_cpu``
   (tests/test_platforms.py). Can go when XLA:CPU's ``h^T G`` with a ``[d, V]`` result runs
   as fast as its transpose.

Dropped: widening bf16 chunks to float32 before each matrix product. XLA:CPU (jaxlib 0.10.2)
multiplies bf16 natively, faster (the fused loss at N 2048, d 512, V 32768 in bf16: 1.13-1.19
s against 1.44-2.35 s widened) and in less memory (150 MiB against 177 MiB at Gemma 2's shape).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.core import row_terms

_fast_paths_on = True


@contextlib.contextmanager
def plain_path_only():
    """Within it, every platform, the CPU included, gets the plain rule (for tests)."""
    global _fast_paths_on
    jax.clear_caches()  # traces made with the other path must not be reused
    _fast_paths_on = False
    try:
        yield
    finally:
        _fast_paths_on = True
        jax.clear_caches()


def per_platform(plain, fast, **keywords):
    """``plain`` on every platform but the CPU, which gets ``fast``, chosen when lowered.

    Both take the same array arguments and return the same types; ``keywords`` (the rule's
    options, a tile's :class:`~jaxsoftmax.core.row_terms.ClassBlock`) are bound to both.
    """
    plain = functools.partial(plain, **keywords) if keywords else plain
    fast = functools.partial(fast, **keywords) if keywords else fast
    return per_platforms(plain, cpu=fast)


def per_platforms(plain, **programs):
    """``plain``, or the program named for the platform it is lowered for (``cpu=``,
    ``tpu=``: ``jax.lax.platform_dependent``'s keywords); ``plain`` alone without any, or
    within :func:`plain_path_only`."""
    if not _fast_paths_on or not programs:
        return plain
    return lambda *args: lax.platform_dependent(*args, default=plain, **programs)


def rows_first_on_the_cpu(compute):
    """``compute(rows_first=True)`` on the CPU, ``compute(rows_first=False)`` elsewhere, chosen
    when lowered (workaround 4): with ``rows_first`` a ``[d, V]`` classifier's gradient is
    summed as its ``[V, d]`` transpose and transposed once at the end."""
    plain = functools.partial(compute, rows_first=False)
    return per_platforms(plain, cpu=functools.partial(compute, rows_first=True))


def _is_widened(logits) -> bool:
    """bf16/f16 logits, which the rule computes in float32."""
    return jnp.dtype(logits.dtype) != row_terms.compute_dtype(logits.dtype)


def _separate_readers(logits):
    """Two names for narrow logits: one for the reductions, one for the other passes.

    An optimization barrier is an identity XLA cannot see through, so each reader widens
    its own copy inside its own loop (workaround 1).
    """
    for_statistics = lax.optimization_barrier(logits)
    return for_statistics, lax.optimization_barrier(for_statistics)


def _shifted_again(logits, top, options):
    """``x - m`` for one more pass over the classes, from names of its own (workaround 1)."""
    logits, top = lax.optimization_barrier((logits, top))
    return row_terms.capped(logits, options) - top


def _statistics_and_shifted(logits, x, class_mask, options):
    """``(m, log_sum)`` and ``x - m``; without a cap the maximum reads the logits as they are
    (half the bytes for narrow logits; widening is exact and keeps the order)."""
    raw = x if options.logit_softcap is not None else logits
    if class_mask is not None:
        x = jnp.where(class_mask, x, -jnp.inf)
        raw = jnp.where(class_mask, raw, -jnp.inf)
    top = row_terms.max_classes(raw, options).astype(x.dtype)
    top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    shifted = x - top
    log_sum = jnp.log(row_terms.sum_classes(jnp.exp(shifted), options))
    return (top, log_sum), shifted


def forward(logits, targets, class_mask, class_weights, row_mask, options):
    """:func:`jaxsoftmax.core.row_terms.forward` for XLA:CPU: integer labels gather their logit
    instead of building a one-hot target; narrow logits get separate readers."""
    num_local = logits.shape[-1]
    widened_only = options.logit_softcap is None and _is_widened(logits)
    other_passes = logits
    if widened_only:
        logits, other_passes = _separate_readers(logits)
    x = row_terms.capped(logits, options)
    dtype = x.dtype
    statistics, shifted = _statistics_and_shifted(logits, x, class_mask, options)
    top = statistics[0]
    eps = options.label_smoothing
    if widened_only and (eps or not row_terms.is_indices(targets)):
        shifted = _shifted_again(other_passes, top, options)
    log_sum = statistics[1]
    r = row_terms.row_weight(targets, class_weights, num_local, dtype, options)
    if row_terms.is_indices(targets):
        # The label's own logit counts even where class_mask drops it (optax's semantics).
        label = row_terms.at_label(row_terms.capped(other_passes, options), targets, options) - top
        smoothing = None
        if eps:
            w = 1.0 if class_weights is None else row_terms.per_class(class_weights, x.ndim, dtype)
            smoothing = w * (log_sum - shifted)
            smoothing = smoothing if class_mask is None else jnp.where(class_mask, smoothing, 0.0)
            smoothing = row_terms.sum_classes(smoothing, options)
        k = row_terms.num_participating(class_mask, num_local, dtype, options)
        cross = row_terms.label_cross_entropy(log_sum, label, smoothing, r, k, options)
    else:
        if widened_only:  # the backward widens bf16 targets too; merged, they are written out
            targets = lax.optimization_barrier(targets)
        q = row_terms.target_vector(targets, class_mask, class_weights, num_local, dtype, options)
        cross = row_terms.sum_classes(jnp.where(q != 0, q * (log_sum - shifted), 0.0), options)
    live = row_terms.live_rows(class_mask, row_mask, options)
    bad = row_terms.bad_label_rows(targets, row_mask, num_local, options)
    return row_terms.row_loss(statistics, cross, r, live, bad, options), statistics


def logits_gradient(logits, targets, class_mask, class_weights, row_mask, statistics, g,
                    options, block=None):  # fmt: skip
    """:func:`jaxsoftmax.core.row_terms.logits_gradient` for XLA:CPU.

    Narrow logits: the plain expression, with ``m`` behind a barrier so the backward widens
    the logits itself (workaround 1). Float32/float64 integer labels: the expression with
    ``q``'s smoothing part over the tile, then each row's label entry overwritten with the
    expression evaluated there with its whole ``q``, a scatter in place (workaround 2).
    """
    if _is_widened(logits):
        statistics = (lax.optimization_barrier(statistics[0]), statistics[1])
    if not row_terms.is_indices(targets) or _is_widened(logits):
        return row_terms.logits_gradient(
            logits, targets, class_mask, class_weights, row_mask, statistics, g, options, block
        )
    num_local = num_total = logits.shape[-1]
    all_weights = class_weights
    if block is not None:
        num_total, all_weights = block.num_classes, block.class_weights
    x = row_terms.capped(logits, options)
    dtype = x.dtype
    live = row_terms.live_rows(class_mask, row_mask, options)
    if live is not None:
        statistics = (statistics[0], jnp.where(live, statistics[1], 0.0))
    scale = row_terms.gradient_scale(
        targets, class_mask, class_weights, num_local, statistics, dtype, options, block
    )
    bad = row_terms.bad_label_rows(targets, row_mask, num_total, options)
    row_g = row_terms.row_cotangent(g, live, bad, dtype)
    smoothing = row_terms.smoothing_vector(
        class_mask, class_weights, num_local, x.ndim, dtype, options, block
    )
    q_rest = 0.0 if smoothing is None else smoothing
    grad = row_terms.gradient_expression(x, q_rest, scale, statistics, row_g, class_mask, options)
    index, owned = _local_label(targets, num_local, options, block)
    pick = lambda values: jnp.take_along_axis(
        values, jnp.clip(index, 0, num_local - 1)[..., None], axis=-1
    )
    label_taking_part = None if class_mask is None else pick(class_mask)
    weight = row_terms.row_weight(targets, all_weights, num_total, dtype, options)
    q_label = (1.0 - options.label_smoothing) * weight
    if smoothing is not None:  # the smoothing vector's entry at the label, eps w_y / K
        k = row_terms.num_participating(class_mask, num_local, dtype, options, block)
        spread = weight * (options.label_smoothing / k)
        if label_taking_part is not None:
            spread = jnp.where(label_taking_part, spread, 0.0)
        q_label = q_label + spread
    label_grad = row_terms.gradient_expression(
        pick(x), q_label, scale, statistics, row_g, label_taking_part, options
    )
    return _set_at_label(grad.astype(logits.dtype), index, owned, label_grad.astype(logits.dtype))


def _local_label(targets, num_local: int, options, block):
    """Each row's label as an index into this tile's classes, and whether the tile holds it."""
    index = targets.astype(jnp.int32)
    if options.axis_name is not None:
        index = index - lax.axis_index(options.axis_name) * num_local
    if block is not None:
        index = index - block.offset
    return index, (index >= 0) & (index < num_local)


def _set_at_label(values, index, owned, label_values):
    """``values`` ``[..., C]`` with ``label_values[..., 0]`` written at each owned row's label:
    a scatter of one entry per row, in place once compiled."""
    num_local = values.shape[-1]
    columns = jnp.where(owned, index, num_local)  # num_local: out of bounds, dropped
    set_one = lambda row, column, value: row.at[column].set(value, mode="drop")
    # Rows as a batch dimension of the scatter (not explicit row indices), so that a batch
    # split over devices stays split: the SPMD partitioner keeps batch dimensions local.
    for _ in range(values.ndim - 1):
        set_one = jax.vmap(set_one)
    return set_one(values, columns, label_values[..., 0])


def narrow_chunk_in_a_cond(take, x):
    """``take`` (a chunk slicer ``(x, start) -> chunk``) for XLA:CPU where ``x`` is bf16 or
    float16, else None: never converting all of ``x`` (workaround 3).

    Inside a ``lax.cond`` XLA:CPU keeps the float32 conversion next to the slice and fuses
    it there: only the chunk is converted. The predicate is always true (chunk starts are
    never negative); the other branch only gives the conditional two.
    """
    if not _is_widened(x):
        return None

    def in_a_cond(x, start):
        return lax.cond(start >= 0, lambda x: take(x, start), lambda x: take(x, 0), x)

    return in_a_cond

"""``linear_cross_entropy(method="forward")``: the gradients computed in the forward pass.

The default path (:mod:`jaxsoftmax.tiles.cross_entropy`) computes the logits twice: once
in the forward for each row's log-sum-exp, once more in the backward to turn each tile into
its gradient. That is four ``N x V x d`` matrix products where the naive composition has
three (``z = h W^T``, ``dh = G W``, ``dW = G^T h``), so it is slower than the naive path when
the products dominate (a CPU, or small vocabularies).

This path does the three products once each. Tokens are cut into blocks of ``T`` rows and
each block's logits are computed for the whole vocabulary, ``z = h[T] W^T + b``
(``[T, V]``). A whole row is then at hand, so the core rule applies to the block as it is:
:func:`jaxsoftmax.core.row_terms.forward` gives each row's loss and statistics and
:func:`jaxsoftmax.core.row_terms.logits_gradient` the block's gradient ``G = dL/dz`` for the
per-row cotangent ``c_n``, which is consumed at once::

    dh[T] = G W          dW += G^T h[T]          db += sum_T G

This needs ``c_n`` before the backward runs, which holds when the loss is reduced to a
scalar: ``L = reduce(loss)`` is linear in the per-row losses, so ``c_n = dL/dloss_n``
(``1`` for ``"sum"``, ``w_n / sum_m w_m`` for ``"mean"``) is known from the labels and
weights alone, and the backward only multiplies the stored gradients by the scalar
cotangent it receives. ``reduction="none"`` hands the backward an arbitrary cotangent per
row, which the sum in ``dW`` cannot take afterwards: that reduction uses the default path.

The cost: ``dW`` (and ``db``) are accumulated over the token blocks in
``accumulation_dtype`` during the forward, one ``[V, d]`` array held until the backward,
and each block holds ``[T, V]`` logits. ``method="auto"`` takes this path only when that
accumulator is small (:data:`AUTO_MAX_CLASSIFIER_SIZE`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.core import companion_terms, cpu_programs, row_terms
from jaxsoftmax.core.cpu_programs import forward as cpu_forward
from jaxsoftmax.core.cpu_programs import logits_gradient as cpu_logits_gradient
from jaxsoftmax.core.cpu_programs import per_platform
from jaxsoftmax.core.reduction import reduce_loss
from jaxsoftmax.tiles import plan as tile_plan

# method="auto" computes the gradients in the forward when V * d is at most this: a float32
# accumulator of at most 256 MiB for the classifier's gradient.
AUTO_MAX_CLASSIFIER_SIZE = 2**26

# Each token block holds at most 2**24 logits (64 MiB in float32): fewer rows than that make
# the [T, d] x [d, V] products run below full speed on a CPU.
_DEFAULT_BLOCK = 2**24


def auto_method(num_classes: int, width: int, reduction: str) -> str:
    """What ``method="auto"`` stands for: ``"forward"`` for a scalar reduction of a
    classifier with at most :data:`AUTO_MAX_CLASSIFIER_SIZE` entries, else ``"recompute"``.

    >>> auto_method(32768, 512, "mean"), auto_method(256000, 2304, "mean")
    ('forward', 'recompute')
    """
    small = num_classes * width <= AUTO_MAX_CLASSIFIER_SIZE
    return "forward" if small and reduction != "none" else "recompute"


def default_block(num_tokens: int, num_classes: int) -> int:
    """Rows per token block: ``min(N, max(1, 2**24 // V))``.

    >>> default_block(2048, 32768)
    512
    """
    return max(1, min(num_tokens, _DEFAULT_BLOCK // max(num_classes, 1)))


def reduction_cotangents(weight, reduction: str):
    """``c_n = dL/dloss_n`` of the reduction: it is linear in the losses, so this does not
    depend on them (the derivative at zero losses is the derivative everywhere)."""
    return jax.grad(lambda loss: reduce_loss(loss, weight, reduction))(jnp.zeros_like(weight))


def _gradients(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, c, plan,
               rows_first=False):  # fmt: skip
    """Per-row losses and the gradients for cotangent ``c`` [N], block by block; a
    ``vocab_mask`` (``[V]``) is every row's class mask. With ``rows_first`` a ``[d, V]``
    classifier's gradient is summed as ``G^T h`` (``[V, d]``) and transposed once at the end
    (for XLA:CPU: :func:`jaxsoftmax.core.cpu_programs.rows_first_on_the_cpu`)."""
    num_tokens, width = hidden.shape
    dtype = row_terms.compute_dtype(jnp.result_type(hidden.dtype, classifier.dtype))
    acc = plan.accumulation_dtype  # never below the inputs' dtype
    acc = classifier.dtype if acc.itemsize < classifier.dtype.itemsize else acc
    dtypes = (dtype, row_terms.compute_dtype(hidden.dtype), acc)
    num_blocks = -(-num_tokens // plan.token_chunk)
    inputs = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, c)
    summed_as = "vd" if rows_first else plan.layout  # the layout of dW's sum
    step = functools.partial(_block_step, inputs, plan, summed_as, dtypes)
    sum_shape = classifier.shape[::-1] if summed_as != plan.layout else classifier.shape
    init = (
        jnp.zeros((num_tokens,), dtype),
        jnp.zeros((num_tokens, width), dtypes[1]),
        jnp.zeros(sum_shape, acc),
        None if bias is None else jnp.zeros(bias.shape, acc),
        *([jnp.zeros((num_tokens,), dtype)] * (5 if plan.companions else 0)),
    )
    (loss, d_hidden, d_classifier, d_bias, *per_row), _ = tile_plan.over_chunks(
        step, init, num_blocks
    )
    if summed_as != plan.layout:
        d_classifier = d_classifier.T
    return loss, (d_hidden, d_classifier, d_bias), per_row


def _block_step(inputs, plan, summed_as, dtypes, carry, j):
    """Block ``j``: its whole rows of logits, their losses and gradient ``G``, consumed at
    once by the three products.

    The last block is moved back to end at N: its first rows were done by the block before,
    and are recomputed identically (losses and dh are overwritten with the same values) but
    left out of dW and db.
    """
    hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, c = inputs
    loss, d_hidden, d_classifier, d_bias, *per_row = carry
    options, block, num_tokens = plan.options, plan.token_chunk, hidden.shape[0]
    t0 = jnp.minimum(j * block, num_tokens - block)
    rows = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, t0, block)
    hidden_t, labels_t, mask_t = rows(hidden), rows(labels), rows(row_mask)
    z = tile_plan.tile_logits(hidden_t, classifier, bias, plan.layout, dtypes[0])
    classes = None if vocab_mask is None else jnp.broadcast_to(vocab_mask, z.shape)
    forward_here = per_platform(row_terms.forward, cpu_forward, options=options)
    gradient_here = per_platform(row_terms.logits_gradient, cpu_logits_gradient, options=options)
    loss_t, statistics = forward_here(z, labels_t, classes, class_weights, mask_t)
    grad = gradient_here(z, labels_t, classes, class_weights, mask_t, statistics, rows(c))
    if plan.companions:  # lse, entropy, correct, m, log_sum of the block's whole rows
        found = _block_companions(z, labels_t, classes, mask_t, statistics, options)
        per_row = [lax.dynamic_update_slice_in_dim(a, b, t0, 0) for a, b in zip(per_row, found)]
    fresh = tile_plan.visited_rows(t0, j, block, num_tokens)  # None unless ragged
    fresh = None if fresh is None else fresh[:, None]
    d_hidden_t, d_classifier, d_bias = _products(
        grad.astype(hidden.dtype), hidden_t, classifier, fresh, (d_classifier, d_bias),
        (plan.layout, summed_as), dtypes,
    )  # fmt: skip
    loss = lax.dynamic_update_slice_in_dim(loss, loss_t, t0, 0)
    d_hidden = lax.dynamic_update_slice_in_dim(d_hidden, d_hidden_t, t0, 0)
    return (loss, d_hidden, d_classifier, d_bias, *per_row), None


def _products(grad_in, hidden_t, classifier, fresh, accumulated, layouts, dtypes):
    """``dh[T] = G W``, ``dW += G^T h[T]``, ``db += sum_T G`` in the inputs' dtype; rows
    not ``fresh`` (a moved-back block's first rows) are left out of ``dW`` and ``db``.
    ``layouts``: the classifier's, and that of the ``dW`` sum."""
    d_classifier, d_bias = accumulated
    (layout, summed_as), (_, hidden_acc, acc) = layouts, dtypes
    d_hidden_t = tile_plan.hidden_gradient(grad_in, classifier, layout, hidden_acc)
    if fresh is not None:
        grad_in = jnp.where(fresh, grad_in, 0)
    # G^T h ([V, d]) or h^T G ([d, V])
    d_classifier = d_classifier + tile_plan.classifier_gradient(grad_in, hidden_t, summed_as, acc)
    if d_bias is not None:
        d_bias = d_bias + jnp.sum(grad_in.astype(acc), axis=0)
    return d_hidden_t, d_classifier, d_bias


def _block_companions(z, labels, classes, row_mask, statistics, options):
    """``(lse, entropy, correct, m, log_sum)`` of a block's whole rows (``return_aux``),
    ``correct`` as 0 or 1 (see :mod:`jaxsoftmax.core.companion_terms`)."""
    x = row_terms.capped(z, options)
    live = row_terms.live_rows(classes, row_mask, options)
    lse, entropy = companion_terms.row_companions(x, statistics, classes, live, options)
    correct = companion_terms.is_correct(x, labels, classes, live, options).astype(x.dtype)
    return lse, entropy, correct, statistics[0][:, 0], statistics[1][:, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def reduced_loss(
    hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, weight, reduction,
    plan, rows_fn, recompute_backward=None,
):  # fmt: skip
    """``reduce(loss_n, w_n)`` for ``"mean"``/``"sum"``, with the gradients from the forward.

    ``rows_fn`` computes the per-row losses without gradients (the default path's forward),
    used when nothing is differentiated; ``weight`` are the reduction's per-row weights.

    With ``plan.companions`` (``return_aux``) it returns ``(loss, lse, entropy, correct)``,
    found on the blocks' whole rows. Their cotangents are per row and arrive only in the
    backward: when any is nonzero, ``recompute_backward`` (the default path's tile-by-tile
    backward) adds the companions' term in one more pass; when none is (the companions only
    logged), that pass is skipped at run time.
    """
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, weight)
    if plan.companions:
        return _reduced_loss_fwd(*args, reduction, plan, rows_fn, recompute_backward)[0]
    loss = rows_fn(hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
    return reduce_loss(loss, weight, reduction)


def _reduced_loss_fwd(
    hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask, weight, reduction,
    plan, rows_fn, recompute_backward=None,
):  # fmt: skip
    c = reduction_cotangents(weight, reduction)
    args = (hidden, classifier, bias, labels, class_weights, row_mask, vocab_mask)
    if plan.layout == "dv":  # on the CPU the [d, V] gradient is summed as [V, d]
        gradients = cpu_programs.rows_first_on_the_cpu(functools.partial(_gradients, plan=plan))
        loss, grads, per_row = gradients(*args, c)
    else:
        loss, grads, per_row = _gradients(*args, c, plan)
    # The stored gradients' target dtypes, as zero-size arrays (residuals must be arrays).
    like = tuple(
        None if x is None else jnp.zeros((0,), x.dtype) for x in (hidden, classifier, bias)
    )
    out = reduce_loss(loss, weight, reduction)
    residuals = (grads, like, loss, weight, class_weights)
    if plan.companions:
        lse, entropy, correct, top, log_sum = per_row
        out = (out, lse, entropy, correct)
        residuals += (args, (top, log_sum, entropy))
    return out, residuals


def _reduced_loss_bwd(reduction, plan, rows_fn, recompute_backward, residuals, g):
    grads, like, loss, weight, class_weights = residuals[:5]
    if plan.companions:
        g, g_lse, g_entropy, _ = g
    scaled = [
        None if d is None else (g.astype(d.dtype) * d).astype(x.dtype) for d, x in zip(grads, like)
    ]
    if plan.companions:
        inputs, statistics = residuals[5:]
        cotangents = (jnp.zeros_like(g_lse), g_lse, g_entropy)
        extra = lambda _: recompute_backward(*inputs, statistics, cotangents)
        nothing = lambda _: tuple(None if x is None else jnp.zeros_like(x) for x in inputs[:3])
        needed = jnp.any(g_lse != 0) | jnp.any(g_entropy != 0)
        added = lax.cond(needed, extra, nothing, None)
        scaled = [None if d is None else d + a.astype(d.dtype) for d, a in zip(scaled, added)]
    # The per-row weights enter the reduction (the mean's denominator) outside the rule.
    (d_weight,) = jax.vjp(lambda w: reduce_loss(loss, w, reduction), weight)[1](g)
    d_class_weights = None if class_weights is None else jnp.zeros_like(class_weights)
    return (*scaled, None, d_class_weights, None, None, d_weight)


reduced_loss.defvjp(_reduced_loss_fwd, _reduced_loss_bwd)

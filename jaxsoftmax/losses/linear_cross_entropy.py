"""``linear_cross_entropy``: the classifier layer and the loss fused, never building the logits.

For a large vocabulary the logits ``z = h W^T + b`` (``[N, V]``) and their gradient are
the largest arrays of a training step. This loss computes the same value and gradients as
``cross_entropy(hidden @ classifier.T + bias, labels, ...)`` while holding only one
``[T, Vc]`` tile of logits at a time (``T`` tokens by ``Vc`` classes): check the arguments
(:func:`jaxsoftmax.checks.linear_call.check_linear_call`), compute per-row losses on the
tiles (:mod:`jaxsoftmax.tiles.cross_entropy`: an online log-sum-exp forward, the core's rule
tile by tile in the backward), reduce.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsoftmax.checks import arrays
from jaxsoftmax.checks.linear_call import LinearCall, check_linear_call
from jaxsoftmax.core import companion_terms
from jaxsoftmax.core.reduction import reduce_loss
from jaxsoftmax.losses.one_program import one_program
from jaxsoftmax.tiles import cross_entropy as fused
from jaxsoftmax.tiles.plan import TilePlan

METHODS = ("auto", "recompute", "forward")


def linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    classifier_layout: str = "vd",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    accumulation_dtype=jnp.float32,
    method: str = "auto",
    return_aux: bool = False,
    vocab_mask: jax.typing.ArrayLike | None = None,
    gradient_filter: float | str | None = None,
) -> jax.Array | tuple[jax.Array, companion_terms.LossAux]:
    r"""Softmax cross-entropy of a linear classifier's logits, without building the logits.

    The value and every gradient equal those of the naive composition

    .. math::

       z = h W^\top + b, \qquad \mathrm{cross\_entropy}(z, y, \dots),

    with the backward from the same derived rule, ``dL/dz = softmax(z) - q`` (with the
    options' terms), applied to one recomputed ``[token_chunk, vocab_chunk]`` tile of logits
    at a time and contracted at once into ``dL/dh = G W``, ``dL/dW = G^T h`` and
    ``dL/db = sum_n G_n``. No ``N x V`` array is allocated in the forward or the backward.

    Args:
      hidden: float ``[..., d]``, the last hidden states.
      classifier: float ``[V, d]`` (``classifier_layout="vd"``, a tied embedding table) or
        ``[d, V]`` (``"dv"``, a Dense kernel ``h @ kernel``), the dtype of ``hidden``.
      labels: integer class indices ``[...]`` (``hidden``'s shape without ``d``).
      bias: float ``[V]`` or None.
      where: bool ``[...]``, the examples to count. (A per-class mask of shape
        ``[..., V]`` would itself be an ``N x V`` array and is not accepted.)
      ignore_index, label_smoothing, class_weights, z_loss, logit_softcap, reduction: as in
        :func:`jaxsoftmax.cross_entropy`.
      classifier_layout: ``"vd"`` or ``"dv"``; the ``"dv"`` kernel is read in column blocks,
        never transposed as a whole.
      token_chunk, vocab_chunk: the tile ``T x Vc``; None picks
        each backend's tile, chosen when the program is lowered (:mod:`jaxsoftmax.tiles.sizes`:
        at most ``1024 x 1024`` on a CPU or TPU, ``1024 x 2048`` on a GPU; ``Vc`` divides
        ``V`` where it can).
        With ``method="forward"``, ``token_chunk`` is the rows per block (None:
        ``min(N, 2**24 // V)``) and ``vocab_chunk`` is not used.
      accumulation_dtype: dtype the classifier's and bias's gradients are summed in over
        the token chunks (float32 by default: bf16 sums lose small contributions); never
        below the inputs' dtype. ``hidden``'s gradient is summed in float32 (or float64).
      method: how the gradients are computed (the values are the same):

        * ``"recompute"``: the forward keeps two numbers per row; the backward recomputes
          each tile of logits. Four ``N V d`` matrix products; memory: a few tiles.
        * ``"forward"``: the gradients are computed in the forward, from blocks of
          ``token_chunk`` whole rows of logits (:mod:`jaxsoftmax.tiles.forward_gradient`).
          Three products, as the naive path; holds the classifier's gradient, ``[V, d]``
          in ``accumulation_dtype``, from the forward to the backward. Scalar reductions
          only (``"mean"``, ``"sum"``).
        * ``"auto"`` (default): on the CPU, ``"forward"`` for a scalar reduction when
          ``V * d <= 2**26`` (an accumulator of at most 256 MiB in float32); else, and on
          every accelerator, ``"recompute"``: the CPU gets speed for small vocabularies,
          a GPU or TPU the least memory. Chosen when the program is lowered.
      return_aux: also return a :class:`~jaxsoftmax.LossAux` of per-example arrays
        (``lse``, ``z_loss``, ``correct``, ``entropy``, ``hidden``'s shape without ``d``),
        from the tiles the loss visits anyway: no second pass over the vocabulary, no
        ``[N, V]`` array. ``lse`` and ``entropy`` are differentiable through the same rule
        (their cotangents add ``softmax * (g_lse - g_H (log softmax + H))`` to each tile's
        gradient). With ``method="forward"`` they come from its blocks' whole rows, and
        their cotangents, known only in the backward, cost one more tile-by-tile pass when
        any is nonzero (none when the companions are only logged).
      vocab_mask: bool ``[V]``, the classes that exist (a vocabulary padded to a multiple of
        64 or 128, as GPT-2's 50257 to 50304): masked classes get no probability, no
        label-smoothing mass, and their classifier rows (and bias) a zero gradient; tiles
        holding only masked classes are skipped. A label on a masked class is a bad label
        (NaN). Equal to :func:`~jaxsoftmax.cross_entropy` of the logits with ``vocab_mask``.
      gradient_filter: None (default: the exact gradient), a float ``eps > 0`` or
        ``"auto"`` (``eps`` = the inputs' dtype resolution / 32, Cut Cross-Entropy's
        choice: 2**-12 for bf16). The backward skips the matrix products of a tile whose
        every gradient entry is at most ``eps`` times its row's cotangent: softmax entries
        below ``eps`` and no label (for the plain loss). An approximation: the skipped
        entries are dropped from ``dL/dh`` and ``dL/dW`` (measured errors in
        docs/linear-cross-entropy.md). Needs ``method="recompute"`` (``"auto"`` takes it).

    There is no ``axis_name``: for a classifier split by vocabulary over a device mesh, use
    :func:`jaxsoftmax.sharded_linear_cross_entropy`, which combines the shards' per-row
    statistics (calling this loss on one shard's rows would normalize over that shard only).

    Returns:
      The reduced loss, or one loss per example with ``reduction="none"``, in ``hidden``'s
      dtype. Statistics are float32 (float64 for float64 inputs) whatever the inputs' dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsoftmax import cross_entropy
      >>> h = jax.random.normal(jax.random.key(0), (6, 4))
      >>> W = jax.random.normal(jax.random.key(1), (10, 4))
      >>> y = jnp.array([0, 3, 9, 2, 2, 7])
      >>> fused = linear_cross_entropy(h, W, y, token_chunk=4, vocab_chunk=3)
      >>> print(bool(jnp.allclose(fused, cross_entropy(h @ W.T, y), atol=1e-5)))
      True
    """
    call = check_linear_call(
        hidden, classifier, labels, bias=bias, where=where, ignore_index=ignore_index,
        label_smoothing=label_smoothing, class_weights=class_weights, z_loss=z_loss,
        logit_softcap=logit_softcap, reduction=reduction, classifier_layout=classifier_layout,
        token_chunk=token_chunk, vocab_chunk=vocab_chunk,
        accumulation_dtype=accumulation_dtype, vocab_mask=vocab_mask,
        gradient_filter=gradient_filter,
    )  # fmt: skip
    check_method(method, call, gradient_filter)
    return_aux = arrays.check_flag(return_aux, "return_aux")
    plan = fused.make_plan(call, call.head.hidden.shape, call.num_classes, companions=return_aux)
    return _linear_cross_entropy(call, plan, _chosen_method(call, method), return_aux)


@one_program
def _linear_cross_entropy(call: LinearCall, plan: TilePlan, method: str, return_aux: bool):
    """The loss of a checked call by ``method``: ``"forward"``, ``"recompute"`` (each row's
    loss and weight on the tiles, then the reduction), or ``"forward on the CPU"``, chosen
    when lowered (:func:`jaxsoftmax.tiles.cross_entropy.forward_on_the_cpu`)."""
    if method == "forward":
        return _reduced_by_forward_gradient(call, plan)
    if method == "forward on the CPU":
        return fused.forward_on_the_cpu(
            lambda: _linear_cross_entropy(call, plan, "forward", return_aux),
            lambda: _linear_cross_entropy(call, plan, "recompute", return_aux),
        )
    loss, weight, *aux = fused.rows_and_weights(
        call.head, call.labels, call.class_weights, call.row_mask, call.vocab_mask, plan
    )
    out = reduce_loss(loss.reshape(call.batch), weight.reshape(call.batch), call.options.reduction)
    out = out.astype(call.head.hidden.dtype)
    if not return_aux:
        return out
    return out, jax.tree.map(lambda a: a.reshape(call.batch), aux[0])


def check_method(method: str, call: LinearCall, gradient_filter) -> None:
    """``method`` is one of :data:`METHODS` and can do what the call asks."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if method == "forward" and call.tiles.gradient_filter is not None:
        raise ValueError(
            'method="forward" cannot filter the gradient: it computes whole rows, not tiles. '
            f'Use method="recompute" or "auto" with gradient_filter={gradient_filter!r}.'
        )
    if method == "forward" and call.options.reduction == "none":
        raise ValueError(
            'method="forward" needs reduction="mean" or "sum" (the gradients are computed '
            'before the per-row cotangents are known); got reduction="none". Use '
            'method="recompute" or "auto".'
        )


def _chosen_method(call: LinearCall, method: str) -> str:
    """``"forward"``, ``"recompute"`` or, for ``"auto"`` with a small classifier,
    ``"forward on the CPU"``; ``"recompute"`` when the gradient filter needs tiles (or there
    are no tokens)."""
    if call.tiles.gradient_filter is not None or call.head.hidden.shape[0] == 0:
        return "recompute"
    chosen = fused.choose_method(call, method)
    return "forward on the CPU" if method == "auto" and chosen == "forward" else chosen


def _reduced_by_forward_gradient(call: LinearCall, plan: TilePlan):
    """The loss (and the aux of each example) of ``method="forward"``."""
    out = fused.reduced_by_forward_gradient(call, plan)
    if not plan.companions:
        return out.astype(call.head.hidden.dtype)
    out, lse, entropy, correct = out  # correct as 0 or 1 in the blocks' float carry
    correct = correct.astype(bool)
    aux = fused.loss_aux(
        lse, entropy, correct, call.labels, call.class_weights, call.num_classes, plan.options
    )
    return out.astype(call.head.hidden.dtype), jax.tree.map(lambda a: a.reshape(call.batch), aux)

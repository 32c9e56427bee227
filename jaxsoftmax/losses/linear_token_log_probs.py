"""``linear_token_log_probs``: token log-probabilities of a classifier's logits, never built.

The log-probability of each sampled token ``y`` under ``softmax((h W^T + b) / T)``, and the
entropy of that softmax, computed by the fused cross-entropy's tiles
(:mod:`jaxsoftmax.tiles.cross_entropy`, the engine of :func:`jaxsoftmax.linear_cross_entropy`):
``log p_y`` is minus its per-token loss and ``H`` the entropy it computes beside it (its
companions), both in float32, so the ``[N, V]`` logits never exist, in the forward or the
backward, and the gradient is the derived rule of both (``(onehot - p) / T`` and
``-p (log p + H) / T``, applied tile by tile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsoftmax.checks.arrays import check_flag
from jaxsoftmax.checks.linear_call import LinearCall, check_linear_call
from jaxsoftmax.checks.linear_head import check_chunk, check_layout, check_linear_head
from jaxsoftmax.checks.token_call import check_positions_mask, check_temperature, check_tokens
from jaxsoftmax.losses.one_program import one_program
from jaxsoftmax.tiles import cross_entropy as fused
from jaxsoftmax.tiles import token_tangents
from jaxsoftmax.tiles.plan import TilePlan


def linear_token_log_probs(
    hidden: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    classifier_layout: str = "vd",
    return_entropy: bool = False,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    batch_invariant: bool = False,
    forward_mode: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r""":func:`~jaxsoftmax.token_log_probs` of ``z = h W^T + b``, without building ``z``.

    At every position ``log p_y = log_softmax(z / T)_y`` and ``H = -sum_c p_c log p_c``, as
    :func:`~jaxsoftmax.token_log_probs` computes them from the logits, with the same derived
    gradients, here applied tile by tile: no ``[N, V]`` array exists in the forward or the
    backward (docs/reinforcement-learning.md). Reverse mode (``jax.grad``, ``jax.vjp``) by
    default; ``forward_mode=True`` for ``jax.jvp`` and ``jax.jacfwd``.

    The temperature divides the logits by dividing the hidden states (and the bias) by ``T``
    before the products, rounded once to their dtype: exact for float32 up to its rounding;
    in bf16 the tempered hidden states carry bf16's rounding, as the products' inputs do.

    Args:
      hidden: ``[..., d]`` hidden states (any leading shape, e.g. ``[B, L, d]``).
      classifier: ``[V, d]`` (or ``[d, V]`` with ``classifier_layout="dv"``).
      tokens: integer ids of shape ``hidden.shape[:-1]``; one outside ``[0, V)`` gives NaN.
      temperature: ``T > 0``, a Python float.
      bias: optional ``[V]``.
      where: optional bool mask of shape ``hidden.shape[:-1]``: False gives 0 and no gradient.
      classifier_layout: ``"vd"`` or ``"dv"``.
      return_entropy: also return the entropy at every position.
      token_chunk, vocab_chunk: the tile, as for :func:`~jaxsoftmax.linear_cross_entropy`.
      batch_invariant: make every position's results bitwise independent of the batch it is
        computed in (its size, its other rows, the position's place in it), so that a sampler
        scoring its tokens with this function gets exactly what the trainer gets. The tokens
        are padded with masked rows to a multiple of a fixed tile of ``token_chunk`` rows
        (:data:`BATCH_INVARIANT_TILE` when None), so every product has the same shape
        whatever the batch; it costs the padded rows' products (up to ``token_chunk - 1``
        rows: nothing for a training batch, 128 times the products of a single token).
        Without it a position's results can differ in the last bits between batch sizes
        (the tile is ``min(N, 1024)`` rows). docs/reinforcement-learning.md, *Batch invariance*.
      forward_mode: compute through a ``jax.custom_jvp`` whose tangent is the derived rule
        applied tile by tile (:mod:`jaxsoftmax.tiles.token_tangents`; no ``[N, V]`` tangent
        exists), so ``jax.jvp`` and ``jax.jacfwd`` work; the default is a ``jax.custom_vjp``
        with the hand-written backward, which JAX refuses to run in forward mode. Reverse
        mode still works with it (JAX transposes the tangent's tiles: the same gradient,
        about 1.5 times the default backward's products), and the forward always computes
        the entropy's running sums (its tangent reads ``lse``).

    Returns:
      ``log p`` of shape ``hidden.shape[:-1]`` in float32 (float64 for float64 inputs), and
      with ``return_entropy`` the pair ``(log p, H)``.

    Example:
      >>> import jax.numpy as jnp, jaxsoftmax
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> classifier = jnp.array([[2.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])  # [V, d]
      >>> print(jaxsoftmax.linear_token_log_probs(hidden, classifier, jnp.array([0, 2])).round(4))
      [-0.1698 -1.0986]
    """
    call, positions, num_tokens = checked_token_call(
        hidden, classifier, tokens, temperature=temperature, bias=bias, where=where,
        classifier_layout=classifier_layout, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
        batch_invariant=batch_invariant,
    )  # fmt: skip
    entropy_too = check_flag(return_entropy, "return_entropy")
    forward_mode = check_flag(forward_mode, "forward_mode")
    plan = fused.make_plan(call, call.head.hidden.shape, call.num_classes, companions=entropy_too)
    log_p, entropy = _linear_token_log_probs(call, plan, forward_mode)
    log_p = log_p[:num_tokens].reshape(positions)
    return (log_p, entropy[:num_tokens].reshape(positions)) if entropy_too else log_p


def checked_token_call(hidden, classifier, tokens, *, temperature, bias, where,
                       classifier_layout, token_chunk, vocab_chunk, batch_invariant,
                       row_multiple: int = 1) -> tuple[LinearCall, tuple, int]:  # fmt: skip
    """``(call, positions, N)``: the arguments checked (named as the caller gave them), the
    tokens flattened, tempered (``h / T``, ``b / T``) and, in batch-invariant mode, padded to
    a multiple of ``row_multiple`` tiles; ``positions`` is the tokens' shape, ``N`` their
    number before padding."""
    layout = check_layout(classifier_layout)
    head, positions = check_linear_head(hidden, classifier, bias, layout)
    tokens = check_tokens(tokens, positions, what="hidden's shape without the feature axis")
    where = check_positions_mask(where, positions)
    temperature = check_temperature(temperature)
    hidden, tokens = head.hidden, tokens.reshape(-1)
    where = None if where is None else where.reshape(-1)
    num_tokens = hidden.shape[0]
    if check_flag(batch_invariant, "batch_invariant"):
        token_chunk = check_chunk(token_chunk, "token_chunk") or BATCH_INVARIANT_TILE
        hidden, tokens, where = padded_to_tiles(hidden, tokens, where, token_chunk * row_multiple)
    call = check_linear_call(
        tempered(hidden, temperature), classifier, tokens,
        bias=None if bias is None else tempered(bias, temperature), where=where,
        reduction="none", classifier_layout=layout, token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
    )  # fmt: skip
    return call, positions, num_tokens


@one_program
def _linear_token_log_probs(call: LinearCall, plan: TilePlan, forward_mode: bool = False):
    """``(log p_y, H)`` per token in float32: minus the fused rows' loss, and their entropy
    (None without ``plan.companions``: the tiles then compute no entropy, forward or
    backward); with ``forward_mode`` both by :func:`~jaxsoftmax.tiles.token_tangents.
    forward_mode_rows`."""
    if forward_mode:
        log_p, entropy = token_tangents.forward_mode_rows(*call.head, call.labels, call.row_mask,
                                                          plan)  # fmt: skip
        return log_p, (entropy if plan.companions else None)
    loss, _, *aux = fused.rows_and_weights(call.head, call.labels, None, call.row_mask, None, plan)
    return -loss, (aux[0].entropy if aux else None)


# The fixed tile of batch-invariant mode: a product shape accelerators run at full speed.
BATCH_INVARIANT_TILE = 128


def padded_to_tiles(hidden, tokens, where, tile: int):
    """``hidden [N, d]``, ``tokens [N]`` and the mask padded with masked rows to a multiple
    of ``tile`` rows."""
    num_tokens = hidden.shape[0]
    padding = -num_tokens % tile if num_tokens else tile
    live = jnp.ones((num_tokens,), bool) if where is None else where
    return (
        jnp.pad(hidden, ((0, padding), (0, 0))),
        jnp.pad(tokens, (0, padding)),
        jnp.pad(live, (0, padding)),
    )


def tempered(x, temperature: float):
    """``x / T`` rounded once to ``x``'s dtype (``x`` itself when ``T = 1``)."""
    if temperature == 1.0:
        return x
    x = jnp.asarray(x)
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(wide) / temperature).astype(x.dtype)

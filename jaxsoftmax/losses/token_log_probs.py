"""``token_log_probs``: each sampled token's log-probability, and the policy's entropy.

For logits ``z [..., V]``, a temperature ``T`` and the tokens ``y [...]``:
``log p_y = log_softmax(z / T)_y`` and ``H = -sum_c p_c log p_c`` at every position, with the
derived rule of :mod:`jaxsoftmax.core.token_terms` in forward and reverse mode.
"""

from __future__ import annotations

import jax

from jaxsoftmax.checks.token_call import check_token_call
from jaxsoftmax.core import token_terms
from jaxsoftmax.losses.one_program import one_program


def token_log_probs(
    logits: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log-probability of each token under ``softmax(logits / temperature)``.

    At every position, with ``x = z / T`` and ``p = softmax(x)``:

    .. math::

       \log p_y = x_y - \operatorname{lse}(x), \qquad H = -\sum_c p_c \log p_c,

    and the derivatives (the derivation in docs/derivation.md, section 10)
    ``d log p_y / dz = (onehot(y) - p) / T`` and ``d H / dz = -p (log p + H) / T``, applied by a
    ``jax.custom_jvp``: ``jax.grad`` with any cotangent on either output, ``jax.jvp`` and
    ``jax.jacfwd`` all use them.

    Args:
      logits: ``[..., V]`` floating-point logits (classes last).
      tokens: integer token ids of shape ``logits.shape[:-1]``. A token outside ``[0, V)``
        cannot be checked under ``jit``: its log-probability is NaN.
      temperature: ``T > 0``, a Python float (the sampler's temperature).
      return_entropy: also return the entropy ``H`` of ``p`` at every position.
      where: optional bool mask of shape ``logits.shape[:-1]``; positions where it is False
        get log-probability 0, entropy 0 and a zero gradient (padding).

    Returns:
      ``log p [...]`` in float32 for bf16, f16 and f32 logits (float64 for float64), and with
      ``return_entropy`` the pair ``(log p, H)``. A row's result does not depend on the other
      rows of the batch (docs/reinforcement-learning.md, *Batch invariance*).

    Example:
      >>> import jax.numpy as jnp, jaxsoftmax
      >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
      >>> log_p, entropy = jaxsoftmax.token_log_probs(logits, jnp.array([0, 2]),
      ...                                             return_entropy=True)
      >>> print(log_p.round(4), entropy.round(4))
      [-0.1698 -1.0986] [0.5243 1.0986]
    """
    call = check_token_call(logits, tokens, where, temperature)
    log_p, entropy = _token_log_probs(*call)
    return (log_p, entropy) if return_entropy else log_p


@one_program
def _token_log_probs(logits, tokens, row_mask, temperature):
    return token_terms.log_probs_and_entropy(logits, tokens, row_mask, temperature)

"""The policy-gradient objectives of reinforcement learning for language models, per token.

A batch holds ``B`` sampled completions (sequences ``i``) of ``L`` token positions ``t``;
``m_it`` says which positions are completion tokens that count, ``n_i = sum_t m_it``. For
each token the caller gives ``log p_it`` (the policy being trained), ``log p_old,it`` (the
policy that sampled it), an advantage ``A_it`` and optionally ``log p_ref,it`` (a frozen
reference) and the entropy ``H_it`` of the policy's distribution there. Each term below is
one function, its formula in its docstring::

    d_it   = log p_it - log p_old,it                                    log_ratios
    r_it   = exp(d_it)                               (importance_level "token")
           = exp(sg[S_i] + log p_it - sg[log p_it]),  S_i = sum_t m_it d_it / n_i
                                                     ("sequence", GSPO)   importance_ratios
    ppo    l_it = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)        ppo_token_losses
                  (dual clip c: l_it = min(l_it, -c A) where A < 0)
    cispo  l_it = -sg[min(r, 1 + eps_high)] A log p_it                    cispo_token_losses
    KL     k1 = -delta, k2 = delta^2 / 2, k3 = exp(delta) - delta - 1,
           delta = log p_ref - log p                                     kl_estimates
    total  l_it + kl_coef KL_it - entropy_coef H_it, on counted tokens
    loss   one of three normalizations of the totals                     normalize

``sg`` is ``jax.lax.stop_gradient``. No argument checks here: the public loss
(:mod:`jaxsoftmax.losses.policy_gradient`) checks first, in
:mod:`jaxsoftmax.checks.policy_call`, and passes every per-token array already zeroed off the
mask (:func:`counted`), so padding holding ``-inf`` or NaN reaches neither the value nor the
gradient.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

OBJECTIVES = ("ppo", "cispo")
NORMALIZATIONS = ("sequence_mean", "token_mean", "fixed_length")
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class PolicyOptions:
    """The static options of a policy-gradient call, checked (hashable, for ``jit``).

    ``epsilon_high`` is already resolved (``epsilon_low`` when not given); ``dual_clip`` is
    the ratio bound ``c > 1`` or None; ``max_length`` is set for ``"fixed_length"`` only.
    """

    objective: str = "ppo"
    normalization: str = "sequence_mean"
    importance_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: float | None = None
    max_length: int | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0


class ClipRegions(NamedTuple):
    """Bool ``[B, L]``: the tokens each clip acts on (False off the mask).

    For ``"ppo"`` these are the tokens whose gradient the clip removes: ``low`` where
    ``A < 0`` and ``r < 1 - eps_low``, ``high`` where ``A > 0`` and ``r > 1 + eps_high``,
    ``dual`` where ``A < 0`` and ``r > c``. For ``"cispo"``, ``high`` marks the tokens whose
    weight is capped, ``r > 1 + eps_high`` whatever the sign of ``A`` (their gradient is
    scaled, not removed); ``low`` and ``dual`` are empty.
    """

    low: jax.Array
    high: jax.Array
    dual: jax.Array


def counted(x, mask):
    """``x`` on counted tokens, 0 elsewhere: ``where(m, x, 0)``. A select, not a product,
    so a NaN or ``-inf`` in padding gets a zero cotangent instead of ``0 * nan``."""
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def log_ratios(log_probs, old_log_probs):
    """``d_it = log p_it - log p_old,it``: the log of the token's importance ratio."""
    return log_probs - old_log_probs


def importance_ratios(log_probs, log_ratio, mask, level: str):
    """The importance ratio each token's objective uses.

    ``"token"`` (PPO, GRPO, DAPO): ``r_it = exp(d_it)``, gradient ``r_it grad log p_it``.

    ``"sequence"`` (GSPO, Zheng et al. 2025): the sequence's ratio is the geometric mean of
    its tokens', ``s_i = exp(S_i)``, ``S_i = sum_t m_it d_it / max(n_i, 1)``, and every token
    gets GSPO's token form

        ``r_it = exp(sg[S_i] + log p_it - sg[log p_it])``

    whose value is ``s_i`` (``log p - sg[log p]`` is exactly 0) and whose gradient is
    ``s_i grad log p_it``. With one advantage per sequence, a token mean of any objective of
    ``r_it`` then has the gradient of the same objective of ``s_i`` itself, ``s_i grad S_i =
    s_i sum_t grad log p_it / n_i``; with per-token advantages it is the paper's GSPO-token.
    """
    if level == "token":
        return jnp.exp(log_ratio)
    lengths = jnp.sum(mask, axis=1, keepdims=True, dtype=log_ratio.dtype)
    sequence = jnp.sum(log_ratio, axis=1, keepdims=True) / jnp.maximum(lengths, 1.0)
    sg = jax.lax.stop_gradient
    return jnp.exp(sg(sequence) + (log_probs - sg(log_probs)))


def clip_regions(ratio, advantages, mask, options: PolicyOptions) -> ClipRegions:
    """Where each clip acts, from the ratio's value (see :class:`ClipRegions`)."""
    positive, negative = mask & (advantages > 0), mask & (advantages < 0)
    upper = ratio > 1.0 + options.epsilon_high
    if options.objective == "cispo":
        return ClipRegions(jnp.zeros_like(mask), mask & upper, jnp.zeros_like(mask))
    low = negative & (ratio < 1.0 - options.epsilon_low)
    dual = jnp.zeros_like(mask)
    if options.dual_clip is not None:
        dual = negative & (ratio > options.dual_clip)
    return ClipRegions(low, positive & upper, dual)


def ppo_token_losses(ratio, advantages, regions: ClipRegions, options: PolicyOptions):
    """PPO's clipped surrogate, negated: ``l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``.

    With ``A > 0`` the minimum is the clipped value ``(1 + eps_high) A`` exactly where
    ``r > 1 + eps_high``; with ``A < 0`` it is ``(1 - eps_low) A`` where ``r < 1 - eps_low``;
    everywhere else it is ``r A``. So ``l = -A where(clipped, bound, r)``: a constant, with
    no gradient, on the clipped tokens, and ``-A r`` (gradient ``-A r grad log p``) on the
    others. Written so, the gradient does not depend on how ``min`` splits a tie.

    Dual clip (Ye et al. 2020, verl's ``clip_ratio_c``, TRL's ``delta``): with ``A < 0`` a
    ratio above ``c > 1`` is not clipped by the above and ``-r A`` grows without bound;
    ``l = min(l, -c A)`` caps it, ``bound = c`` on those tokens.
    """
    bound = jnp.where(regions.low, 1.0 - options.epsilon_low, 1.0 + options.epsilon_high)
    if options.dual_clip is not None:
        bound = jnp.where(regions.dual, options.dual_clip, bound)
    clipped = regions.low | regions.high | regions.dual
    return -advantages * jnp.where(clipped, bound.astype(ratio.dtype), ratio)


def cispo_token_losses(ratio, advantages, log_probs, options: PolicyOptions):
    """CISPO (MiniMax-M1, 2025): ``l = -sg[min(r, 1 + eps_high)] A log p``.

    The importance weight is capped from above and carries no gradient; the gradient is
    ``-min(r, 1 + eps_high) A grad log p`` on every token, clipped or not (PPO's clip
    removes the clipped tokens' gradient instead). The value is not PPO's ``-r A``: only the
    gradient is meaningful.
    """
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + options.epsilon_high))
    return -weight * advantages * log_probs


def kl_estimates(log_probs, ref_log_probs, estimator: str):
    """Per-token estimates of ``KL(p || p_ref)`` from the sampled token (Schulman, 2020).

    With ``delta = log p_ref - log p``: ``k1 = -delta = log p - log p_ref`` (unbiased, can be
    negative), ``k2 = delta^2 / 2`` (biased, low variance), ``k3 = exp(delta) - delta - 1``
    (unbiased, never negative; GRPO's, verl's ``low_var_kl``), computed as
    ``expm1(delta) - delta`` so that a small ``delta`` keeps its digits. Gradients with
    respect to ``log p``: ``1``, ``-delta`` and ``1 - exp(delta)``.
    """
    delta = ref_log_probs - log_probs
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta * delta
    return jnp.expm1(delta) - delta


def _divide(total, count):
    """``total / count``, and 0 where ``count`` is 0 (no token: a loss of 0, not NaN)."""
    nonzero = count > 0
    return jnp.where(nonzero, total / jnp.where(nonzero, count, 1.0), 0.0)


def normalize(token_losses, mask, options: PolicyOptions, num_tokens=None, num_sequences=None):
    """The loss from the per-token totals ``l_it`` (0 off the mask).

    * ``"sequence_mean"`` (GRPO): ``(1 / G) sum_i (sum_t l_it) / max(n_i, 1)``;
    * ``"token_mean"`` (DAPO, TRL's bnpo and dapo, verl's token-mean):
      ``sum_it l_it / N``;
    * ``"fixed_length"`` (Dr. GRPO): ``sum_it l_it / (G L_max)``.

    ``G`` is ``num_sequences`` (default ``B``) and ``N`` is ``num_tokens`` (default ``sum_it
    m_it``): counts of the whole batch when this one is a part of it, so that the parts'
    losses sum to the whole batch's. With no token (``N = 0``) the loss is 0.
    """
    dtype = token_losses.dtype
    if options.normalization == "token_mean":
        count = jnp.sum(mask, dtype=dtype) if num_tokens is None else num_tokens.astype(dtype)
        return _divide(jnp.sum(token_losses), count)
    sequences = mask.shape[0] if num_sequences is None else num_sequences.astype(dtype)
    if options.normalization == "sequence_mean":
        lengths = jnp.sum(mask, axis=1, dtype=dtype)
        per_sequence = jnp.sum(token_losses, axis=1) / jnp.maximum(lengths, 1.0)
        return _divide(jnp.sum(per_sequence), sequences)
    return jnp.sum(token_losses) / (sequences * options.max_length)


def masked_mean(x, mask):
    """``sum_it m_it x_it / sum_it m_it``, 0 with no counted token."""
    return _divide(jnp.sum(counted(x, mask)), jnp.sum(mask, dtype=x.dtype))

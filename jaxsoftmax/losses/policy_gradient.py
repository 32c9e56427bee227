"""``policy_gradient_loss``: the clipped policy-gradient losses of RL for language models.

GRPO, PPO, DAPO, Dr. GRPO, GSPO and CISPO on per-token log-probabilities: one function whose
three independent choices (the objective, the importance ratio's level and the
normalization) name these algorithms, with an optional KL penalty to a reference policy and
an entropy bonus. The math, one term per function, is :mod:`jaxsoftmax.core.policy_objectives`;
the checks :mod:`jaxsoftmax.checks.policy_call`. Plain JAX: ``jax.grad`` differentiates the
composition (no custom rule is needed; ``stop_gradient`` where the algorithms put it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsoftmax.checks.policy_call import PolicyCall, check_policy_call
from jaxsoftmax.core import policy_objectives as objectives
from jaxsoftmax.losses.one_program import one_program


class PolicyGradientMetrics(NamedTuple):
    """What trainers log beside the loss: scalars without gradient, over this batch's counted
    tokens (0 when it has none). Fractions are of counted tokens (see
    :class:`~jaxsoftmax.core.policy_objectives.ClipRegions`); a part of a larger batch gives
    its own, to be averaged with ``token_count`` as weights.

    Attributes:
      clip_fraction: tokens any clip acts on (PPO: whose gradient it removes; CISPO: whose
        weight is capped).
      low_clip_fraction: PPO's ``r < 1 - epsilon_low`` with ``A < 0`` (0 for CISPO).
      high_clip_fraction: PPO's ``r > 1 + epsilon_high`` with ``A > 0``; CISPO's ``r > 1 +
        epsilon_high``, any ``A``.
      dual_clip_fraction: ``r > dual_clip`` with ``A < 0`` (0 without ``dual_clip``).
      ratio_mean, ratio_min, ratio_max: the importance ratio ``r`` over the counted tokens
        (with ``importance_level="sequence"``, each token carries its sequence's ``s_i``).
      kl_mean: the mean of the ``kl_estimator``'s per-token estimate; None without
        ``ref_log_probs``.
      entropy_mean: the mean of ``entropy``; None without it.
      token_count: the number of counted tokens, int32.
    """

    clip_fraction: jax.Array
    low_clip_fraction: jax.Array
    high_clip_fraction: jax.Array
    dual_clip_fraction: jax.Array
    ratio_mean: jax.Array
    ratio_min: jax.Array
    ratio_max: jax.Array
    kl_mean: jax.Array | None
    entropy_mean: jax.Array | None
    token_count: jax.Array


def policy_gradient_loss(
    log_probs: jax.typing.ArrayLike,
    old_log_probs: jax.typing.ArrayLike | None,
    advantages: jax.typing.ArrayLike,
    *,
    mask: jax.typing.ArrayLike,
    objective: str = "ppo",
    normalization: str = "sequence_mean",
    importance_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    max_length: int | None = None,
    num_tokens: jax.typing.ArrayLike | None = None,
    num_sequences: jax.typing.ArrayLike | None = None,
    ref_log_probs: jax.typing.ArrayLike | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: jax.typing.ArrayLike | None = None,
    entropy_coef: float = 0.0,
) -> tuple[jax.Array, PolicyGradientMetrics]:
    r"""The policy-gradient loss of ``B`` sampled sequences, token by token.

    With ``d_t = log p_t - log p_old,t`` and the importance ratio ``r_t = exp(d_t)``, each
    counted token's loss is

    .. math::

       l_t = -\min\big(r_t A_t,\ \mathrm{clip}(r_t, 1 - \epsilon_{low}, 1 + \epsilon_{high})
       A_t\big) + \beta\, \mathrm{KL}_t - c_H H_t

    (``objective="ppo"``), or CISPO's ``l_t = -sg[min(r_t, 1 + eps_high)] A_t log p_t``
    (``objective="cispo"``: the capped weight carries no gradient, every token's gradient
    flows through ``log p_t``). ``importance_level="sequence"`` (GSPO) replaces ``r_t`` by
    the sequence's ``s_i = exp(mean_t d_t)``, as GSPO's token form ``exp(sg[log s_i] + log
    p_t - sg[log p_t])``: value ``s_i``, gradient ``s_i grad log p_t``; the clip acts on
    ``s_i``. ``dual_clip`` ``c > 1`` caps ``l_t`` at ``-c A_t`` where ``A_t < 0``. The KL
    estimate (``delta = log p_ref - log p``): ``k1 = -delta``, ``k2 = delta^2 / 2``, ``k3 =
    exp(delta) - delta - 1``. Then, with ``n_i`` sequence ``i``'s counted tokens:

    * ``"sequence_mean"``: ``(1 / G) sum_i (sum_t l_it) / n_i`` (GRPO);
    * ``"token_mean"``: ``sum_it l_it / N`` (DAPO; TRL's bnpo and dapo; verl's token-mean);
    * ``"fixed_length"``: ``sum_it l_it / (G max_length)`` (Dr. GRPO).

    The algorithms, as arguments:

    ==========  =================================================================
    GRPO        the defaults (TRL's ``loss_type="grpo"``)
    DAPO        ``normalization="token_mean", epsilon_high=0.28``
    Dr. GRPO    ``normalization="fixed_length", max_length=`` the generation's limit
    GSPO        ``importance_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4``
    CISPO       ``objective="cispo", normalization="token_mean", epsilon_high=`` e.g. 4.0
    PPO         ``[B, L]`` advantages (e.g. GAE), ``normalization="token_mean"``
    ==========  =================================================================

    **A batch in parts** (gradient accumulation, data parallelism): the losses of the parts
    sum to the whole batch's, and so do their gradients, when each part passes the whole
    batch's count: ``num_tokens=`` the counted tokens of all parts (``"token_mean"``), or
    ``num_sequences=`` the sequences of all parts (``"sequence_mean"``, ``"fixed_length"``).
    Sum the parts' gradients (``psum`` across devices); a step that averages them over ``D``
    devices (``pmean``) must multiply the loss by ``D``, as TRL divides its count by the
    number of processes and verl multiplies by ``dp_size``. Without the counts each part is
    normalized alone (TRL's bnpo), and its loss is the whole batch's only if the parts are
    alike.

    Args:
      log_probs: float ``[B, L]``: ``log p`` of each sampled token under the policy trained.
        bf16 and f16 are computed in float32, float64 stays float64.
      old_log_probs: float ``[B, L]``, the sampling policy's ``log p_old``; None for an
        on-policy step: ``stop_gradient(log_probs)`` (ratio 1, gradient ``grad log p``).
      advantages: float ``[B]`` (one per sequence) or ``[B, L]`` (one per token).
      mask: bool ``[B, L]``: the completion tokens that count (padding, prompts and tool
        outputs False). What other positions hold (NaN, ``-inf``) reaches neither the loss
        nor the gradient.
      objective: ``"ppo"`` (the clipped surrogate) or ``"cispo"``.
      normalization: ``"sequence_mean"``, ``"token_mean"`` or ``"fixed_length"``.
      importance_level: ``"token"`` or ``"sequence"`` (GSPO).
      epsilon_low: ``0 <= eps_low <= 1``, PPO's clip below (``1 - eps_low``); CISPO has none.
      epsilon_high: ``eps_high >= 0``, the clip above (``1 + eps_high``) of both objectives;
        None: ``epsilon_low``.
      dual_clip: ``c > 1`` or None: PPO's dual clip for negative advantages.
      max_length: ``"fixed_length"``'s constant, at least ``L``.
      num_tokens: ``"token_mean"``'s ``N``, a number or a 0-d array (traced is fine);
        default this batch's counted tokens.
      num_sequences: ``G``, as ``num_tokens``; default ``B`` (every row, with tokens or not).
      ref_log_probs: float ``[B, L]``: a reference policy's ``log p_ref``, for the KL term
        (and ``metrics.kl_mean``).
      kl_coef: ``beta >= 0``, the KL term's weight (needs ``ref_log_probs`` when above 0).
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      entropy: float ``[B, L]``: the policy's entropy at each token, differentiable.
      entropy_coef: ``c_H >= 0``, the entropy bonus (needs ``entropy`` when above 0).

    Returns:
      ``(loss, metrics)``: the loss, a scalar in the compute dtype (float32, or float64),
      and a :class:`PolicyGradientMetrics`.

    A mask with no token, or an advantage that is not finite on a counted token, raises a
    ``ValueError`` when known in Python; under ``jax.jit`` the first gives a loss of 0 with a
    zero gradient, the second a NaN loss.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.5, 0.25], [0.5, 0.5]]))
      >>> old = jnp.log(jnp.array([[0.25, 0.25], [0.5, 1.0]]))
      >>> mask = jnp.array([[True, True], [True, False]])
      >>> loss, metrics = policy_gradient_loss(log_probs, old, jnp.array([1.0, -1.0]),
      ...                                      mask=mask)
      >>> print(f"{float(loss):.4f}", f"{float(metrics.high_clip_fraction):.4f}")
      -0.0500 0.3333
    """
    call = check_policy_call(
        log_probs, old_log_probs, advantages, mask=mask, objective=objective,
        normalization=normalization, importance_level=importance_level,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip,
        max_length=max_length, num_tokens=num_tokens, num_sequences=num_sequences,
        ref_log_probs=ref_log_probs, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy=entropy, entropy_coef=entropy_coef,
    )  # fmt: skip
    dtype = jnp.dtype(call.log_probs.dtype)  # float32 or float64, else float32
    dtype = jax.dtypes.canonicalize_dtype(dtype if dtype.itemsize >= 4 else jnp.float32)
    return _policy_gradient(call, dtype)


@one_program
def _policy_gradient(call: PolicyCall, dtype):
    """The loss and metrics of a checked call, computed in ``dtype``: per-token terms, then
    the normalization."""
    options, mask = call.options, call.mask
    per_token = lambda x: None if x is None else objectives.counted(x.astype(dtype), mask)
    log_probs = per_token(call.log_probs)
    old = jax.lax.stop_gradient(log_probs) if call.old_log_probs is None else call.old_log_probs
    advantages = call.advantages
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], mask.shape)
    advantages = per_token(advantages)
    log_ratio = objectives.log_ratios(log_probs, per_token(old))
    ratio = objectives.importance_ratios(log_probs, log_ratio, mask, options.importance_level)
    regions = objectives.clip_regions(ratio, advantages, mask, options)
    if options.objective == "cispo":
        token_losses = objectives.cispo_token_losses(ratio, advantages, log_probs, options)
    else:
        token_losses = objectives.ppo_token_losses(ratio, advantages, regions, options)
    kl = entropy = None
    if call.ref_log_probs is not None:
        kl = objectives.kl_estimates(log_probs, per_token(call.ref_log_probs),
                                     options.kl_estimator)  # fmt: skip
        if options.kl_coef:
            token_losses = token_losses + options.kl_coef * kl
    if call.entropy is not None:
        entropy = per_token(call.entropy)
        if options.entropy_coef:
            token_losses = token_losses - options.entropy_coef * entropy
    token_losses = objectives.counted(token_losses, mask)
    loss = objectives.normalize(token_losses, mask, options, call.num_tokens, call.num_sequences)
    metrics = _metrics(*jax.lax.stop_gradient((ratio, kl, entropy)), regions, mask)
    return loss, metrics


def _metrics(ratio, kl, entropy, regions, mask) -> PolicyGradientMetrics:
    """The metrics over the counted tokens (see :class:`PolicyGradientMetrics`)."""
    fraction = lambda region: objectives.masked_mean(region.astype(ratio.dtype), mask)
    count = jnp.sum(mask, dtype=jnp.int32)
    extreme = lambda reduce, fill: jnp.where(
        count > 0, reduce(jnp.where(mask, ratio, fill)), jnp.zeros((), ratio.dtype)
    )
    return PolicyGradientMetrics(
        clip_fraction=fraction(regions.low | regions.high | regions.dual),
        low_clip_fraction=fraction(regions.low),
        high_clip_fraction=fraction(regions.high),
        dual_clip_fraction=fraction(regions.dual),
        ratio_mean=objectives.masked_mean(ratio, mask),
        ratio_min=extreme(jnp.min, jnp.inf),
        ratio_max=extreme(jnp.max, -jnp.inf),
        kl_mean=None if kl is None else objectives.masked_mean(kl, mask),
        entropy_mean=None if entropy is None else objectives.masked_mean(entropy, mask),
        token_count=count,
    )

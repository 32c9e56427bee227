"""``preference_loss``: DPO and its family on whole responses' log-probabilities.

DPO's sigmoid loss (with conservative DPO's label smoothing), IPO, SLiC's hinge, robust DPO,
SimPO, ORPO and CPO, on each pair's chosen and rejected responses' log-probabilities
(:func:`~jaxsoftmax.sequence_log_probs`), with the metrics trainers log. The math, one
function per loss type, is :mod:`jaxsoftmax.core.preference_objectives`; the checks
:mod:`jaxsoftmax.checks.preference_call`. Plain JAX: ``jax.grad`` differentiates the
composition, and through the token log-probabilities' derived rule each token of a response
gets the pair's coefficient times ``onehot - p``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsoftmax.checks.preference_call import (
    PreferenceCall,
    PreferenceOptions,
    check_preference_call,
)
from jaxsoftmax.core import preference_objectives as objectives
from jaxsoftmax.core.sequence_sums import SequenceLogProbs
from jaxsoftmax.losses.one_program import one_program


class PreferenceMetrics(NamedTuple):
    """What trainers log beside the loss: scalars without gradient, means over this batch's
    counted pairs (0 when it has none). A part of a larger batch gives its own, to be averaged
    with ``pair_count`` as weights.

    Attributes:
      chosen_reward, rejected_reward: the implicit rewards' means: ``beta (pi - ref)`` for the
        DPO family (``"ipo"``: of mean log-probabilities), ``beta pi`` for ``"simpo"``,
        ``"orpo"`` and ``"cpo"`` (with the log-probability each type uses), as TRL logs them.
      reward_margin: the mean of ``chosen_reward - rejected_reward`` over the pairs.
      reward_accuracy: the fraction of pairs whose chosen reward exceeds the rejected one.
      chosen_log_prob, rejected_log_prob: the means of the policy's log-probabilities the
        type uses (sums, or means for ``"ipo"``, ``"simpo"``, ``"orpo"``).
      log_odds_ratio: ORPO's mean ``log_odds`` (the log of the odds ratio); None for the
        other types.
      nll: the chosen responses' negative log-likelihood per token, for ``"orpo"``, ``"cpo"``
        and any type with ``nll_coef > 0``; else None.
      pair_count: the number of counted pairs, int32.
    """

    chosen_reward: jax.Array
    rejected_reward: jax.Array
    reward_margin: jax.Array
    reward_accuracy: jax.Array
    chosen_log_prob: jax.Array
    rejected_log_prob: jax.Array
    log_odds_ratio: jax.Array | None
    nll: jax.Array | None
    pair_count: jax.Array


def preference_loss(
    chosen: SequenceLogProbs,
    rejected: SequenceLogProbs,
    *,
    reference_chosen: SequenceLogProbs | None = None,
    reference_rejected: SequenceLogProbs | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    nll_coef: float | None = None,
    num_pairs: jax.typing.ArrayLike | None = None,
    num_chosen_tokens: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, PreferenceMetrics]:
    r"""A preference-optimisation loss over pairs of responses.

    Pair ``p`` holds a chosen and a rejected response to one prompt. With ``pi_c``, ``pi_r``
    the policy's log-probabilities of the two, ``ref_c``, ``ref_r`` a frozen reference
    model's, ``m`` a response's mean token log-probability (``total / count``), ``s`` the
    sigmoid, ``eps`` the label smoothing and

    .. math::

       u = (\pi_c - \mathrm{ref}_c) - (\pi_r - \mathrm{ref}_r), \qquad
       L(x) = -(1 - \epsilon) \log s(x) - \epsilon \log s(-x),

    each pair's term is, by ``loss_type``:

    ===========  ================================================================  =======
    ``sigmoid``  ``L(beta u)`` (DPO; conservative DPO with ``eps > 0``)            sums
    ``robust``   ``(-(1-eps) log s(beta u) + eps log s(-beta u)) / (1 - 2 eps)``   sums
    ``hinge``    ``relu(1 - beta u)`` (SLiC)                                       sums
    ``ipo``      ``(u - 1 / (2 beta))^2`` (IPO, ``tau = beta``)                    means
    ``simpo``    ``L(beta (m_c - m_r) - gamma)``, no reference                     means
    ``cpo``      ``L(beta (pi_c - pi_r))`` + ``nll_coef`` NLL, no reference        sums
    ``orpo``     ``-beta log s(log_odds)`` + ``nll_coef`` NLL, no reference        means
    ===========  ================================================================  =======

    The last column is the log-probability each type reads, as TRL's trainers do: the sum
    over the response's tokens, or the mean (``u`` of means for IPO). ORPO's log odds ratio
    is ``log_odds = (m_c - m_r) - (log(1 - e^{m_c}) - log(1 - e^{m_r}))`` and its ``beta`` is
    the paper's ``lambda``. NLL is the chosen responses' negative log-likelihood per token,
    ``-sum_p pi_c,p / N`` with ``N`` their tokens. Then

    .. math::

       \text{loss} = \frac{1}{P} \sum_p l_p + \text{nll\_coef} \cdot \text{NLL},

    over the counted pairs: a pair counts when both its responses have tokens (both empty: a
    padding pair). ``nll_coef`` defaults to 1 for ORPO and CPO (their papers' weight) and to
    0 for the others (``"sigmoid"`` with ``nll_coef > 0`` is RPO, TRL's ``rpo_alpha``;
    ``"simpo"`` with it CPO-SimPO).

    **A batch in parts** (gradient accumulation, data parallelism): the parts' losses and
    gradients sum to the whole batch's when each part passes the whole batch's counts:
    ``num_pairs=`` its counted pairs (``P``) and, with an NLL, ``num_chosen_tokens=`` its
    counted chosen tokens (``N``).

    Args:
      chosen, rejected: :class:`~jaxsoftmax.SequenceLogProbs` of the policy, of one shape
        (any; ``[P]`` from :func:`~jaxsoftmax.preference_pairs`).
      reference_chosen, reference_rejected: the reference model's, the same shape, both or
        neither: needed by ``"sigmoid"``, ``"ipo"``, ``"hinge"``, ``"robust"``; refused by
        ``"simpo"``, ``"orpo"``, ``"cpo"`` (reference-free). Their counts must be the policy's.
        Constants to the loss: no gradient flows to them.
      loss_type: one of the seven above.
      beta: ``> 0``.
      label_smoothing: ``eps`` in ``[0, 1/2]`` (``< 1/2`` for ``"robust"``): the probability
        that a pair's label is flipped; for the logistic types ``"sigmoid"``, ``"robust"``,
        ``"simpo"`` and ``"cpo"`` only.
      gamma: SimPO's margin (``"simpo"`` only).
      nll_coef: ``>= 0``, the weight of the chosen responses' NLL; None: 1.0 for ``"orpo"``
        and ``"cpo"``, 0.0 otherwise.
      num_pairs: ``P``, a number or a 0-d array (traced is fine); default this batch's
        counted pairs.
      num_chosen_tokens: ``N`` of the NLL, likewise; default this batch's counted chosen
        tokens.

    Returns:
      ``(loss, metrics)``: a scalar in float32 (float64 for float64 totals) and a
      :class:`PreferenceMetrics`.

    A pair with exactly one empty response, a batch with no counted pair (unless it is a part
    given ``num_pairs``), and a reference whose counts differ from the policy's raise a
    ``ValueError`` where the counts are known in Python; under ``jax.jit`` such a pair is not
    counted, and a batch without pairs gives a loss of 0 with a zero gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> chosen = SequenceLogProbs(jnp.array([-2.0, -3.0]), jnp.array([2, 3]))
      >>> rejected = SequenceLogProbs(jnp.array([-4.0, -3.5]), jnp.array([2, 4]))
      >>> reference = SequenceLogProbs(jnp.array([-3.0, -3.0]), jnp.array([2, 3]))
      >>> loss, metrics = preference_loss(
      ...     chosen, rejected, reference_chosen=reference,
      ...     reference_rejected=SequenceLogProbs(jnp.array([-3.0, -3.0]), jnp.array([2, 4])))
      >>> print(f"{float(loss):.4f}", metrics.reward_accuracy, metrics.reward_margin)
      0.6333 1.0 0.125
    """
    call = check_preference_call(
        chosen, rejected, reference_chosen=reference_chosen,
        reference_rejected=reference_rejected, loss_type=loss_type, beta=beta,
        label_smoothing=label_smoothing, gamma=gamma, nll_coef=nll_coef, num_pairs=num_pairs,
        num_chosen_tokens=num_chosen_tokens,
    )  # fmt: skip
    return preference_of_call(call)


def preference_of_call(call: PreferenceCall) -> tuple[jax.Array, PreferenceMetrics]:
    """The loss and metrics of a checked call (the fused losses' tail), in float32, or
    float64 when a total is float64."""
    totals = [s.total for s in call[:4] if s is not None]
    dtype = jnp.float64 if any(t.dtype == jnp.float64 for t in totals) else jnp.float32
    return _preference(call, jnp.dtype(dtype))


@one_program
def _preference(call: PreferenceCall, dtype):
    """Per pair: the log-probabilities the type reads, its term; then the normalisation."""
    options = call.options
    flat = lambda s: None if s is None else SequenceLogProbs(
        s.total.reshape(-1).astype(dtype), s.count.reshape(-1)
    )  # fmt: skip
    chosen, rejected, reference_chosen, reference_rejected = map(flat, call[:4])
    counted = (chosen.count > 0) & (rejected.count > 0)
    # The uncounted pairs read a harmless value (-1: a mean log-probability ORPO can take),
    # so no term or gradient of theirs is NaN before the select drops it.
    safe = lambda x: jnp.where(counted, x, -jnp.ones((), dtype))
    read = lambda s: safe(s.mean if options.uses_means else s.total)
    pi_c, pi_r = read(chosen), read(rejected)
    references = None
    if options.uses_reference:
        references = [jax.lax.stop_gradient(read(s)) for s in (reference_chosen,
                                                                reference_rejected)]  # fmt: skip
    terms, chosen_ratio, rejected_ratio, log_odds = _pair_terms(options, pi_c, pi_r, references)
    zero = jnp.zeros((), dtype)
    pairs = jnp.sum(counted, dtype=dtype) if call.num_pairs is None else call.num_pairs
    loss = objectives.divide(jnp.sum(jnp.where(counted, terms, zero)), pairs.astype(dtype))
    nll = None
    if options.reports_nll:
        nll = objectives.nll(chosen.total, chosen.count, counted, call.num_chosen_tokens)
        if options.nll_coef:
            loss = loss + options.nll_coef * nll
    sg = jax.lax.stop_gradient
    rewards = sg((options.beta * chosen_ratio, options.beta * rejected_ratio))
    metrics = _metrics(*rewards, *sg((pi_c, pi_r, log_odds, nll)), counted)
    return loss, metrics


def _pair_terms(options: PreferenceOptions, pi_c, pi_r, references):
    """``(l_p, chosen ratio, rejected ratio, log_odds)``: each pair's term of the loss type
    (see :mod:`jaxsoftmax.core.preference_objectives`), the log-ratios its rewards scale
    (``pi - ref``, or ``pi`` without a reference) and ORPO's log odds ratio (else None)."""
    beta, eps = options.beta, options.label_smoothing
    if options.uses_reference:
        chosen_ratio, rejected_ratio = pi_c - references[0], pi_r - references[1]
        u = chosen_ratio - rejected_ratio
        terms = {
            "sigmoid": lambda: objectives.sigmoid_losses(u, beta, eps),
            "robust": lambda: objectives.robust_losses(u, beta, eps),
            "hinge": lambda: objectives.hinge_losses(u, beta),
            "ipo": lambda: objectives.ipo_losses(u, beta),
        }[options.loss_type]()
        return terms, chosen_ratio, rejected_ratio, None
    if options.loss_type == "simpo":
        return objectives.simpo_losses(pi_c, pi_r, beta, options.gamma, eps), pi_c, pi_r, None
    if options.loss_type == "cpo":
        return objectives.cpo_losses(pi_c, pi_r, beta, eps), pi_c, pi_r, None
    log_odds = objectives.log_odds_ratios(pi_c, pi_r)
    return objectives.orpo_losses(log_odds, beta), pi_c, pi_r, log_odds


def _metrics(chosen_reward, rejected_reward, pi_c, pi_r, log_odds, nll, counted):
    """The metrics over the counted pairs (see :class:`PreferenceMetrics`)."""
    mean = lambda x: objectives.masked_mean(x, counted)
    better = (chosen_reward > rejected_reward).astype(chosen_reward.dtype)
    return PreferenceMetrics(
        chosen_reward=mean(chosen_reward),
        rejected_reward=mean(rejected_reward),
        reward_margin=mean(chosen_reward - rejected_reward),
        reward_accuracy=mean(better),
        chosen_log_prob=mean(pi_c),
        rejected_log_prob=mean(pi_r),
        log_odds_ratio=None if log_odds is None else mean(log_odds),
        nll=nll,
        pair_count=jnp.sum(counted, dtype=jnp.int32),
    )

"""The preference-optimisation objectives, one function per loss type, per pair of responses.

A batch holds ``P`` pairs ``p`` of responses to the same prompt, a chosen (preferred, ``c``)
and a rejected one (``r``). Each response's log-probability is a sum over its tokens
(:mod:`jaxsoftmax.core.sequence_sums`) or, length-normalised, that sum over its length: write
``pi`` for the policy's, ``ref`` for a frozen reference model's, ``beta > 0`` for the inverse
temperature and ``eps`` for the label smoothing. With the DPO family's implicit reward margin
``u = (pi_c - ref_c) - (pi_r - ref_r)`` and ``L(x) = -(1 - eps) log sigmoid(x) - eps log
sigmoid(-x)`` (the logistic loss with labels smoothed, :func:`smoothed_logistic`)::

    sigmoid   L(beta u)                                   DPO; cDPO with eps > 0
    robust    (-(1 - eps) log s(beta u) + eps log s(-beta u)) / (1 - 2 eps)    robust DPO
    hinge     relu(1 - beta u)                            SLiC
    ipo       (u - 1 / (2 beta))^2, on means              IPO
    simpo     L(beta (m_c - m_r) - gamma), on means       SimPO (no reference)
    cpo       L(beta (pi_c - pi_r)) + NLL                 CPO (no reference)
    orpo      -beta log s(log_odds) + NLL, on means       ORPO (no reference)

``s`` is the sigmoid and ``m`` a mean log-probability. The loss sums the pairs' terms over
a number of pairs, and adds ``nll_coef`` times the chosen responses' negative log-likelihood
per token (:func:`nll`). No argument checks here (:mod:`jaxsoftmax.checks.preference_call`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The loss types that compare with a reference model (the DPO family) and those that do not.
REFERENCE_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCE_FREE_TYPES = ("simpo", "orpo", "cpo")
LOSS_TYPES = REFERENCE_TYPES + REFERENCE_FREE_TYPES
# The loss types that use each response's mean token log-probability (total / count), as TRL
# does; the others use the sum.
MEAN_TYPES = ("ipo", "simpo", "orpo")
# The loss types label smoothing applies to (the logistic ones).
SMOOTHED_TYPES = ("sigmoid", "robust", "simpo", "cpo")


def smoothed_logistic(x, eps: float):
    """``L(x) = -(1 - eps) log sigmoid(x) - eps log sigmoid(-x)``: the logistic loss of a
    preference whose label is flipped with probability ``eps`` (cDPO, Mitchell 2023).
    Gradient ``-(1 - eps) sigmoid(-x) + eps sigmoid(x) = sigmoid(x) - (1 - eps)``."""
    loss = -jax.nn.log_sigmoid(x)
    if eps:
        loss = (1.0 - eps) * loss - eps * jax.nn.log_sigmoid(-x)
    return loss


def sigmoid_losses(u, beta: float, eps: float):
    """DPO (Rafailov et al. 2023): ``L(beta u)``; its gradient is ``-beta sigmoid(-beta u)``
    times ``grad u`` (the pair's weight: large where the policy still ranks it wrongly)."""
    return smoothed_logistic(beta * u, eps)


def robust_losses(u, beta: float, eps: float):
    """Robust DPO (Chowdhury et al. 2024), an unbiased loss under labels flipped with
    probability ``eps < 1/2``:
    ``(-(1 - eps) log sigmoid(beta u) + eps log sigmoid(-beta u)) / (1 - 2 eps)``."""
    x = beta * u
    return (-(1.0 - eps) * jax.nn.log_sigmoid(x) + eps * jax.nn.log_sigmoid(-x)) / (1.0 - 2 * eps)


def hinge_losses(u, beta: float):
    """SLiC's hinge (Zhao et al. 2023): ``relu(1 - beta u)``."""
    return jax.nn.relu(1.0 - beta * u)


def ipo_losses(u, beta: float):
    """IPO (Azar et al. 2023, eq. 17, ``tau = beta``): ``(u - 1 / (2 beta))^2``, with ``u``
    from the responses' mean log-probabilities."""
    return jnp.square(u - 1.0 / (2.0 * beta))


def simpo_losses(mean_chosen, mean_rejected, beta: float, gamma: float, eps: float):
    """SimPO (Meng et al. 2024): ``L(beta (m_c - m_r) - gamma)``, the margin ``gamma`` on the
    reward scale; no reference. (TRL's CPO trainer writes ``beta (m_c - m_r - gamma / beta)``:
    the same.)"""
    return smoothed_logistic(beta * (mean_chosen - mean_rejected) - gamma, eps)


def cpo_losses(chosen, rejected, beta: float, eps: float):
    """CPO's preference term (Xu et al. 2024): ``L(beta (pi_c - pi_r))`` on summed
    log-probabilities; no reference (the NLL is added by the loss)."""
    return smoothed_logistic(beta * (chosen - rejected), eps)


def log1mexp(x):
    """``log(1 - exp(x))`` for ``x < 0``, in two branches split at ``-log 2`` (Maechler
    2012): ``log1p(-exp(x))`` below, ``log(-expm1(x))`` above, each fed only the inputs of its
    branch so the other's derivative cannot make a NaN."""
    split = jnp.asarray(-0.6931471805599453, x.dtype)
    low = x < split
    return jnp.where(low, jnp.log1p(-jnp.exp(jnp.where(low, x, split))),
                     jnp.log(-jnp.expm1(jnp.where(low, split, x))))  # fmt: skip


def log_odds_ratios(mean_chosen, mean_rejected):
    """ORPO's log odds ratio of mean log-probabilities ``m``, ``odds = e^m / (1 - e^m)``:
    ``log_odds = (m_c - m_r) - (log(1 - e^{m_c}) - log(1 - e^{m_r}))``."""
    return (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))


def orpo_losses(log_odds, beta: float):
    """ORPO's odds-ratio term (Hong et al. 2024, ``lambda = beta``): ``-beta log
    sigmoid(log_odds)`` (the NLL is added by the loss)."""
    return -beta * jax.nn.log_sigmoid(log_odds)


def divide(total, count):
    """``total / count``, and 0 where ``count`` is 0 (nothing counted: 0, not NaN)."""
    nonzero = count > 0
    return jnp.where(nonzero, total / jnp.where(nonzero, count, 1).astype(total.dtype), 0.0)


def nll(chosen_totals, chosen_counts, counted, num_tokens=None):
    """The chosen responses' negative log-likelihood per token,
    ``-sum_p S_c,p / N``, over the counted pairs; ``N`` is ``num_tokens`` (the whole batch's
    count, for a batch in parts), by default ``sum_p n_c,p`` (TRL's cross-entropy mean)."""
    dtype = chosen_totals.dtype
    total = -jnp.sum(jnp.where(counted, chosen_totals, jnp.zeros((), dtype)))
    if num_tokens is None:
        num_tokens = jnp.sum(jnp.where(counted, chosen_counts, 0))
    return divide(total, num_tokens.astype(dtype))


def masked_mean(x, counted):
    """The mean of ``x`` over the counted pairs, 0 with none."""
    zero = jnp.zeros((), x.dtype)
    return divide(jnp.sum(jnp.where(counted, x, zero)), jnp.sum(counted, dtype=x.dtype))

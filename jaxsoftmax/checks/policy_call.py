"""The arguments of :func:`~jaxsoftmax.policy_gradient_loss`, checked into one value.

:func:`check_policy_call` checks the per-token arrays' shapes and dtypes, the options
(:func:`check_policy_options`) and the whole-batch counts, and returns a
:class:`PolicyCall`. Shapes, dtypes and options raise under any transformation. Two checks
need values, and run only where the values are known in Python (an eager call, or
``jax.grad`` of one, where ``mask`` and ``advantages`` stay concrete): a mask that selects no
token, and an advantage that is not finite on a counted token. Under ``jax.jit`` they cannot
raise: a mask with no token gives a loss of 0 with a zero gradient (and metrics of 0), and a
NaN or infinite advantage makes the loss NaN.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsoftmax.checks import arrays
from jaxsoftmax.core.policy_objectives import (
    IMPORTANCE_LEVELS,
    KL_ESTIMATORS,
    NORMALIZATIONS,
    OBJECTIVES,
    PolicyOptions,
)

# What other libraries' names for a loss are here, for the message of an unknown choice.
ALGORITHMS = {
    "grpo": "the defaults (objective='ppo', normalization='sequence_mean')",
    "bnpo": "normalization='token_mean'",
    "dapo": "normalization='token_mean' (with num_tokens= the whole batch's count)",
    "dr_grpo": "normalization='fixed_length' with max_length=",
    "cispo": "objective='cispo' with normalization='token_mean'",
    "gspo": "importance_level='sequence'",
    "vanilla": "objective='ppo'",
    "token-mean": "normalization='token_mean'",
    "seq-mean-token-mean": "normalization='sequence_mean'",
    "seq-mean-token-sum-norm": "normalization='fixed_length' with max_length=",
    "low_var_kl": "kl_estimator='k3'",
    "kl": "kl_estimator='k1'",
    "mse": "kl_estimator='k2'",
}


class PolicyCall(NamedTuple):
    """A policy-gradient call, checked: ``log_probs [B, L]``, ``old_log_probs`` (None:
    on-policy), ``advantages [B]`` or ``[B, L]``, ``mask [B, L]``, ``ref_log_probs`` and
    ``entropy`` (or None), the whole batch's counts (0-d arrays, or None: this batch's) and
    the static options."""

    log_probs: jax.Array
    old_log_probs: jax.Array | None
    advantages: jax.Array
    mask: jax.Array
    ref_log_probs: jax.Array | None
    entropy: jax.Array | None
    num_tokens: jax.Array | None
    num_sequences: jax.Array | None
    options: PolicyOptions


def check_policy_call(
    log_probs, old_log_probs, advantages, *, mask, objective="ppo",
    normalization="sequence_mean", importance_level="token", epsilon_low=0.2,
    epsilon_high=None, dual_clip=None, max_length=None, num_tokens=None, num_sequences=None,
    ref_log_probs=None, kl_coef=0.0, kl_estimator="k3", entropy=None, entropy_coef=0.0,
) -> PolicyCall:  # fmt: skip
    """Checks :func:`~jaxsoftmax.policy_gradient_loss`'s arguments (see there)."""
    log_probs = _float_array(log_probs, "log_probs")
    if log_probs.ndim != 2 or 0 in log_probs.shape:
        raise ValueError(
            "log_probs must be [B, L]: one log-probability per token, B >= 1 sequences of "
            f"L >= 1 positions; got {arrays.describe(log_probs)}."
        )
    shape = tuple(log_probs.shape)
    old_log_probs, ref_log_probs, entropy = (
        _token_array(x, name, shape)
        for x, name in ((old_log_probs, "old_log_probs"), (ref_log_probs, "ref_log_probs"),
                        (entropy, "entropy"))
    )  # fmt: skip
    mask = _token_mask(mask, shape)
    advantages = _advantages(advantages, shape)
    options = check_policy_options(
        objective=objective, normalization=normalization, importance_level=importance_level,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip,
        max_length=max_length, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, length=shape[1],
    )  # fmt: skip
    _needed(kl_coef=(options.kl_coef, ref_log_probs, "ref_log_probs"),
            entropy_coef=(options.entropy_coef, entropy, "entropy"))  # fmt: skip
    tokens = _known_tokens(mask, advantages)
    num_tokens = _whole_batch_count(
        num_tokens, "num_tokens", options.normalization == "token_mean", tokens,
        "the counted tokens (mask's True entries)", "normalization='token_mean'",
    )  # fmt: skip
    num_sequences = _whole_batch_count(
        num_sequences, "num_sequences", options.normalization != "token_mean", shape[0],
        "the sequences (log_probs' rows)", "normalization='sequence_mean' or 'fixed_length'",
    )  # fmt: skip
    return PolicyCall(log_probs, old_log_probs, advantages, mask, ref_log_probs, entropy,
                      num_tokens, num_sequences, options)  # fmt: skip


def check_policy_options(
    *, objective, normalization, importance_level, epsilon_low, epsilon_high, dual_clip,
    max_length, kl_coef, kl_estimator, entropy_coef, length: int,
) -> PolicyOptions:  # fmt: skip
    """The static options, checked, as a :class:`PolicyOptions` (``length`` is ``L``)."""
    objective = _choice(objective, "objective", OBJECTIVES)
    normalization = _choice(normalization, "normalization", NORMALIZATIONS)
    epsilon_low = arrays.check_number(epsilon_low, "epsilon_low", low=0.0, high=1.0)
    epsilon_high = arrays.check_number(epsilon_high, "epsilon_high", low=0.0, allow_none=True)
    if objective == "cispo" and epsilon_low != 0.2:
        raise ValueError(
            f"epsilon_low={epsilon_low} bounds PPO's clip from below and applies to "
            "objective='ppo' only: CISPO's weight min(r, 1 + epsilon_high) has no lower "
            "bound (MiniMax-M1), so no token's gradient is dropped. Leave epsilon_low out."
        )
    dual_clip = arrays.check_number(dual_clip, "dual_clip", low=1.0, low_open=True,
                                    allow_none=True)  # fmt: skip
    if dual_clip is not None and objective != "ppo":
        raise ValueError(
            f"dual_clip={dual_clip} caps PPO's loss for negative advantages and applies to "
            f"objective='ppo' only; got objective={objective!r}."
        )
    return PolicyOptions(
        objective=objective, normalization=normalization,
        importance_level=_choice(importance_level, "importance_level", IMPORTANCE_LEVELS),
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_low if epsilon_high is None else epsilon_high,
        dual_clip=dual_clip, max_length=_max_length(max_length, normalization, length),
        kl_coef=arrays.check_number(kl_coef, "kl_coef", low=0.0),
        kl_estimator=_choice(kl_estimator, "kl_estimator", KL_ESTIMATORS),
        entropy_coef=arrays.check_number(entropy_coef, "entropy_coef", low=0.0),
    )  # fmt: skip


def _choice(value, name: str, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    hint = ""
    if isinstance(value, str) and value.lower() in ALGORITHMS:
        hint = f" {value!r} is {ALGORITHMS[value.lower()]} here."
    raise ValueError(f"{name} must be one of {choices}; got {value!r}.{hint}")


def _float_array(x, name: str):
    x = arrays.as_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float16, bfloat16, float32 or float64); "
            f"got {arrays.describe(x)}."
        )
    return x


def _token_array(x, name: str, shape: tuple):
    """A float array of ``log_probs``' shape, or None."""
    if x is None:
        return None
    x = _float_array(x, name)
    if tuple(x.shape) != shape:
        raise ValueError(
            f"{name} must have log_probs' shape {shape}, one value per token; got "
            f"{arrays.describe(x)}. Nothing is broadcast."
        )
    return x


def _token_mask(mask, shape: tuple):
    mask = arrays.as_array(mask, "mask")
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be a boolean array of shape {shape} (True on the completion tokens "
            f"that count); got {arrays.describe(mask)}. Cast a 0/1 mask with mask.astype(bool)."
        )
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"mask must have log_probs' shape {shape}; got {arrays.describe(mask)}. "
            "Nothing is broadcast."
        )
    return mask


def _advantages(advantages, shape: tuple):
    advantages = _float_array(advantages, "advantages")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"advantages must be [B] = {shape[:1]} (one per sequence, shared by its tokens) "
            f"or [B, L] = {shape} (one per token); got {arrays.describe(advantages)}."
        )
    return advantages


def _needed(**terms) -> None:
    """A coefficient above 0 needs the array its term reads."""
    for coef_name, (coef, array, array_name) in terms.items():
        if coef > 0 and array is None:
            raise ValueError(
                f"{coef_name}={coef} adds a term that reads {array_name}, but {array_name} is "
                f"None. Pass {array_name}= (shape [B, L]), or {coef_name}=0.0."
            )


def _max_length(max_length, normalization: str, length: int):
    if normalization != "fixed_length":
        if max_length is not None:
            raise ValueError(
                f"max_length={max_length!r} is Dr. GRPO's constant and applies to "
                f"normalization='fixed_length' only; got normalization={normalization!r}."
            )
        return None
    if max_length is None:
        raise ValueError(
            "normalization='fixed_length' divides by B * max_length, but max_length is None. "
            "Pass the generation's maximum completion length, the same for every batch."
        )
    try:
        max_length = operator.index(max_length)
    except TypeError:
        raise TypeError(
            f"max_length must be an int; got {type(max_length).__name__} {max_length!r}."
        ) from None
    if max_length < length:
        raise ValueError(
            f"max_length must be at least log_probs' length L = {length} (the generation's "
            f"maximum completion length); got {max_length}."
        )
    return max_length


def _is_known(*xs) -> bool:
    """Whether every array has a value in Python (not a tracer of jit, vmap, grad...)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _known_tokens(mask, advantages):
    """The number of counted tokens where the mask is known (else None), after the checks
    that need values: some token counts, and every counted token's advantage is finite."""
    if not _is_known(mask):
        return None
    counts = np.asarray(mask)
    if not counts.any():
        raise ValueError(
            f"mask selects no token: all {counts.size} entries are False, so the loss would "
            "be 0 with no gradient. (Under jax.jit this cannot be checked: the loss is 0.)"
        )
    if _is_known(advantages):
        values = np.asarray(advantages, np.float64)
        used = counts if values.ndim == 2 else counts.any(axis=1)
        bad = used & ~np.isfinite(values)
        if bad.any():
            position = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"advantages must be finite on the counted tokens; got {values[position]} at "
                f"position {position}. (Under jax.jit this cannot be checked: the loss is NaN.)"
            )
    return int(counts.sum())


def _whole_batch_count(value, name: str, applies: bool, local, what: str, where: str):
    """A count of the whole batch (a Python number or a 0-d array), or None."""
    if value is None:
        return None
    if not applies:
        raise ValueError(f"{name} applies to {where} only; got {name}={value!r}.")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a 0-d array; got {value!r}.")
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = np.asarray(value, np.int32 if isinstance(value, (int, np.integer)) else np.float32)
    value = arrays.as_array(value, name)
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.number):
        raise TypeError(f"{name} must be a number or a 0-d array; got {arrays.describe(value)}.")
    if _is_known(value):
        count, least = float(np.asarray(value)), 1 if local is None else local
        if not (np.isfinite(count) and count >= least):
            raise ValueError(
                f"{name} counts {what} of the whole batch this one is part of: a finite number"
                f" of at least {least} (this batch's count, where known); got {count}."
            )
    return value

"""The arguments of :func:`~jaxsoftmax.preference_loss`, checked into one value.

:func:`check_preference_call` checks the responses' log-probabilities (each a
:class:`~jaxsoftmax.SequenceLogProbs` of one shape), the reference (both sides or none; needed
by the DPO family, refused by the reference-free types) and the options
(:func:`check_preference_options`), and returns a :class:`PreferenceCall`. The counts' checks
here are shared with the fused losses (:mod:`jaxsoftmax.checks.linear_preference_call`).

Shapes, dtypes and options raise under any transformation. The checks that need values run
only where the counts are known in Python (an eager call, or ``jax.grad`` of one): a pair with
exactly one empty response, a batch with no pair, a reference that counts other tokens than
the policy, a whole-batch count below this batch's. Under ``jax.jit`` they cannot raise: a
pair with an empty response is not counted, and a batch with no counted pair gives a loss of
0 with a zero gradient.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsoftmax.checks import arrays
from jaxsoftmax.checks.sequence_call import check_sequences, is_known
from jaxsoftmax.core.preference_objectives import (
    LOSS_TYPES,
    MEAN_TYPES,
    REFERENCE_FREE_TYPES,
    REFERENCE_TYPES,
    SMOOTHED_TYPES,
)
from jaxsoftmax.core.sequence_sums import SequenceLogProbs

# Other libraries' names (TRL's loss_type, Liger Kernel's classes, the papers'), for the
# message of an unknown loss_type: what each is here, or None where it is not implemented.
ALIASES = {
    "dpo": "loss_type='sigmoid' (DPO's loss; with label_smoothing > 0, conservative DPO)",
    "cdpo": "loss_type='sigmoid' with label_smoothing= the flip probability",
    "rdpo": "loss_type='robust'",
    "robust_dpo": "loss_type='robust'",
    "slic": "loss_type='hinge'",
    "rpo": "loss_type='sigmoid' with nll_coef= (TRL's rpo_alpha)",
    "cpo_simpo": "loss_type='simpo' with nll_coef=1.0",
    **dict.fromkeys(
        (
            "sigmoid_norm",
            "kto",
            "kto_pair",
            "exo_pair",
            "bco_pair",
            "sppo_hard",
            "nca_pair",
            "aot",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "discopop",
            "sft",
            "alphapo",
        ),
    ),  # fmt: skip
}


@dataclasses.dataclass(frozen=True)
class PreferenceOptions:
    """The static options of a preference call, checked (hashable, for ``jit``).

    ``nll_coef`` is resolved (1.0 for ``"orpo"`` and ``"cpo"``, 0.0 for the others when not
    given); ``uses_means`` says whether the type reads mean log-probabilities (``"ipo"``,
    ``"simpo"``, ``"orpo"``) or sums.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    nll_coef: float = 0.0

    @property
    def uses_means(self) -> bool:
        return self.loss_type in MEAN_TYPES

    @property
    def uses_reference(self) -> bool:
        return self.loss_type in REFERENCE_TYPES

    @property
    def reports_nll(self) -> bool:
        """Whether the metrics carry the NLL: for ORPO and CPO, or where it is weighted."""
        return self.nll_coef > 0 or self.loss_type in ("orpo", "cpo")


class PreferenceCall(NamedTuple):
    """A preference call, checked: the pairs' log-probabilities (each a
    :class:`SequenceLogProbs`, every one of the same shape), the reference's or None, the
    whole-batch counts (0-d arrays, or None: this batch's) and the static options."""

    chosen: SequenceLogProbs
    rejected: SequenceLogProbs
    reference_chosen: SequenceLogProbs | None
    reference_rejected: SequenceLogProbs | None
    num_pairs: jax.Array | None
    num_chosen_tokens: jax.Array | None
    options: PreferenceOptions


# --- preference_loss ---------------------------------------------------------------------


def check_preference_call(
    chosen, rejected, *, reference_chosen=None, reference_rejected=None, loss_type="sigmoid",
    beta=0.1, label_smoothing=0.0, gamma=0.5, nll_coef=None, num_pairs=None,
    num_chosen_tokens=None,
) -> PreferenceCall:  # fmt: skip
    """Checks :func:`~jaxsoftmax.preference_loss`'s arguments (see there)."""
    options = check_preference_options(loss_type=loss_type, beta=beta,
                                       label_smoothing=label_smoothing, gamma=gamma,
                                       nll_coef=nll_coef)  # fmt: skip
    chosen = check_sequences(chosen, "chosen")
    rejected = check_sequences(rejected, "rejected")
    shape = tuple(chosen.total.shape)
    _same_shape(rejected, "rejected", shape)
    if (reference_chosen is None) != (reference_rejected is None):
        given, missing = (
            ("reference_chosen", "reference_rejected")
            if reference_rejected is None
            else ("reference_rejected", "reference_chosen")
        )
        raise ValueError(
            f"{given} is given but {missing} is None: the reference scores both responses of "
            "every pair. Pass both, or neither."
        )
    given = reference_chosen is not None
    check_reference_needed(options, given, "reference_chosen= and reference_rejected=")
    if given:
        reference_chosen = check_sequences(reference_chosen, "reference_chosen")
        reference_rejected = check_sequences(reference_rejected, "reference_rejected")
        _same_shape(reference_chosen, "reference_chosen", shape)
        _same_shape(reference_rejected, "reference_rejected", shape)
    counts = [known_counts(s, n) for s, n in ((chosen, "chosen"), (rejected, "rejected"))]
    pairs = chosen_tokens = None
    if counts[0] is not None and counts[1] is not None:
        pairs, chosen_tokens = check_pair_counts(*counts, "chosen", "rejected",
                                                 part=num_pairs is not None)  # fmt: skip
        if given:
            for policy, reference, name in ((counts[0], reference_chosen, "chosen"),
                                            (counts[1], reference_rejected, "rejected")):  # fmt: skip
                check_same_counts(policy, known_counts(reference, f"reference_{name}"), name)
    num_pairs, num_chosen_tokens = check_whole_batch_counts(num_pairs, num_chosen_tokens,
                                                            options, pairs, chosen_tokens)  # fmt: skip
    return PreferenceCall(chosen, rejected, reference_chosen, reference_rejected, num_pairs,
                          num_chosen_tokens, options)  # fmt: skip


def check_preference_options(*, loss_type, beta, label_smoothing, gamma, nll_coef):
    """The static options, checked, as a :class:`PreferenceOptions`."""
    loss_type = _loss_type(loss_type)
    beta = arrays.check_number(beta, "beta", low=0.0, low_open=True)
    eps = arrays.check_number(label_smoothing, "label_smoothing", low=0.0, high=0.5)
    if loss_type == "robust" and eps == 0.5:
        raise ValueError(
            "label_smoothing must be < 0.5 for loss_type='robust' (it divides by "
            "1 - 2 label_smoothing); got 0.5."
        )
    if eps and loss_type not in SMOOTHED_TYPES:
        raise ValueError(
            f"label_smoothing={eps} smooths the logistic losses {SMOOTHED_TYPES} only; got "
            f"loss_type={loss_type!r}. Leave label_smoothing at 0.0."
        )
    gamma = arrays.check_number(gamma, "gamma")
    if gamma != 0.5 and loss_type != "simpo":
        raise ValueError(
            f"gamma={gamma} is SimPO's target margin and applies to loss_type='simpo' only; "
            f"got loss_type={loss_type!r}. Leave gamma out."
        )
    default = 1.0 if loss_type in ("orpo", "cpo") else 0.0
    nll_coef = arrays.check_number(nll_coef, "nll_coef", low=0.0, allow_none=True)
    return PreferenceOptions(loss_type=loss_type, beta=beta, label_smoothing=eps, gamma=gamma,
                             nll_coef=default if nll_coef is None else nll_coef)  # fmt: skip


def check_reference_needed(options: PreferenceOptions, given: bool, what: str) -> None:
    """The DPO family needs a reference; SimPO, ORPO and CPO take none."""
    if options.uses_reference and not given:
        raise ValueError(
            f"loss_type={options.loss_type!r} compares the policy with a reference model, but "
            f"no reference is given: pass {what}. (The reference-free losses are "
            f"{REFERENCE_FREE_TYPES}.)"
        )
    if given and not options.uses_reference:
        raise ValueError(
            f"loss_type={options.loss_type!r} is reference-free by definition, but a reference "
            f"is given ({what}). Leave it out, or use one of {REFERENCE_TYPES}."
        )


def _loss_type(value) -> str:
    if isinstance(value, str) and value in LOSS_TYPES:
        return value
    hint = ""
    if isinstance(value, str) and value.lower() in ALIASES:
        meaning = ALIASES[value.lower()]
        hint = (f" {value!r} is {meaning} here." if meaning is not None
                else f" {value!r} (TRL's or Liger Kernel's) is not implemented here.")  # fmt: skip
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}; got {value!r}.{hint}")


def _same_shape(x: SequenceLogProbs, name: str, shape: tuple) -> None:
    if tuple(x.total.shape) != shape:
        raise ValueError(
            f"{name} must have chosen's shape {shape}, one response per pair; got "
            f"{arrays.describe(x.total)}. Nothing is broadcast."
        )


def known_counts(x: SequenceLogProbs, name: str):
    """``x.count`` as NumPy where known (else None), after checking it is not negative."""
    if not is_known(x.count):
        return None
    counts = np.asarray(x.count)
    if (counts < 0).any():
        position = tuple(int(i) for i in np.argwhere(counts < 0)[0])
        raise ValueError(
            f"{name}.count must be >= 0 (numbers of tokens); got {counts[position]} at "
            f"position {position}."
        )
    return counts


def check_pair_counts(chosen, rejected, chosen_name: str, rejected_name: str, *,
                      part: bool = False):  # fmt: skip
    """``(pairs, chosen tokens)`` counted from known NumPy counts of one shape: a pair counts
    when both responses have tokens; a pair with both empty is padding; one empty is an error,
    and so is a batch with no pair unless it is a ``part`` of a larger one (``num_pairs``
    given)."""
    lone = (chosen > 0) != (rejected > 0)
    if lone.any():
        position = tuple(int(i) for i in np.argwhere(lone)[0])
        empty = chosen_name if chosen[position] == 0 else rejected_name
        raise ValueError(
            f"pair {position} has an empty {empty} response (0 tokens) and a non-empty other: "
            "each pair compares two responses with tokens (both empty is a padding pair, not "
            "counted). (Under jax.jit this cannot be checked: the pair is not counted.)"
        )
    counted = chosen > 0
    if not counted.any() and not part:
        raise ValueError(
            f"no pair has tokens: all {counted.size} pairs are empty, so the loss would be 0 "
            "with no gradient. (A part of a larger batch, given num_pairs=, may have none; "
            "under jax.jit this cannot be checked: the loss is 0.)"
        )
    return int(counted.sum()), int(chosen[counted].sum())


def check_same_counts(policy, reference, name: str) -> None:
    if reference is None or np.array_equal(policy, reference):
        return
    position = tuple(int(i) for i in np.argwhere(policy != reference)[0])
    raise ValueError(
        f"reference_{name}.count differs from {name}.count at pair {position} "
        f"({reference[position]} tokens against {policy[position]}): the reference must score "
        f"the same tokens as the policy. A reference known only by its sums: "
        f"SequenceLogProbs(total, {name}.count)."
    )


def check_whole_batch_counts(num_pairs, num_chosen_tokens, options: PreferenceOptions,
                             pairs, chosen_tokens):  # fmt: skip
    """``(num_pairs, num_chosen_tokens)`` as 0-d arrays or None, checked against this batch's
    counts where known."""
    num_pairs = _whole_batch_count(num_pairs, "num_pairs", pairs, "the counted pairs")
    if num_chosen_tokens is not None and options.nll_coef == 0:
        raise ValueError(
            f"num_chosen_tokens={num_chosen_tokens!r} divides the chosen responses' NLL, which "
            f"loss_type={options.loss_type!r} with nll_coef=0 does not add. Leave it out, or "
            "pass nll_coef > 0."
        )
    num_chosen_tokens = _whole_batch_count(num_chosen_tokens, "num_chosen_tokens",
                                           chosen_tokens, "the counted chosen tokens")  # fmt: skip
    return num_pairs, num_chosen_tokens


def _whole_batch_count(value, name: str, local, what: str):
    """A count of the whole batch (a Python number or a 0-d array), or None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a 0-d array; got {value!r}.")
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = np.asarray(value, np.int32 if isinstance(value, (int, np.integer)) else np.float32)
    value = arrays.as_array(value, name)
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.number):
        raise TypeError(f"{name} must be a number or a 0-d array; got {arrays.describe(value)}.")
    if is_known(value):
        count, least = float(np.asarray(value)), max(1, local or 0)
        if not (np.isfinite(count) and count >= least):
            raise ValueError(
                f"{name} counts {what} of the whole batch this one is part of: a finite number "
                f"of at least {least} (this batch's count, where known); got {count}."
            )
    return value

"""The arguments of the fused preference losses, checked into one value.

:func:`check_linear_preference` checks those of :func:`~jaxsoftmax.linear_preference_loss` and
:func:`~jaxsoftmax.sharded_linear_preference_loss` that the token log-probabilities do not
(those check the policy's head and the tiles again when called): the responses (a mask or
segment ids of the tokens' shape), their layout and pairs, the reference given once (a model's
``(hidden, classifier[, bias])`` scoring the same tokens over the same vocabulary, or its
precomputed sequences, one per pair) and the options of
:mod:`jaxsoftmax.checks.preference_call`. Where the mask or segment ids are known in Python,
the pairs' counts are checked before any computation, as
:func:`~jaxsoftmax.preference_loss` checks them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jaxsoftmax.checks import arrays
from jaxsoftmax.checks.linear_head import check_layout, check_linear_head
from jaxsoftmax.checks.preference_call import (
    PreferenceOptions,
    check_pair_counts,
    check_preference_options,
    check_reference_needed,
    check_same_counts,
    check_whole_batch_counts,
    known_counts,
)
from jaxsoftmax.checks.sequence_call import (
    check_layout_name,
    check_pairable,
    check_responses,
    check_sequences,
    is_known,
    numpy_pairs,
    response_counts,
)
from jaxsoftmax.core.sequence_sums import SequenceLogProbs


class LinearPreferenceCall(NamedTuple):
    """A fused preference call, checked (the policy's head is checked again by
    :func:`~jaxsoftmax.linear_token_log_probs`): the responses' mask or segment ids, the
    layout, the reference model's ``(hidden, classifier, bias)`` or its precomputed pair, the
    whole-batch counts and the options."""

    mask: jax.Array | None
    segment_ids: jax.Array | None
    num_segments: int | None
    layout: str
    reference: tuple | None
    reference_log_probs: tuple[SequenceLogProbs, SequenceLogProbs] | None
    num_pairs: jax.Array | None
    num_chosen_tokens: jax.Array | None
    options: PreferenceOptions


def check_linear_preference(
    hidden, classifier, tokens, *, mask, segment_ids, num_segments, layout, reference,
    reference_log_probs, bias, classifier_layout, loss_type, beta, label_smoothing, gamma,
    nll_coef, num_pairs, num_chosen_tokens,
) -> LinearPreferenceCall:  # fmt: skip
    """Checks the fused preference losses' arguments (the tiles' are checked by the token
    log-probabilities): the policy's and the reference's heads, the responses, the pairs, the
    reference given once and in the right shape, and the options."""
    options = check_preference_options(loss_type=loss_type, beta=beta,
                                       label_smoothing=label_smoothing, gamma=gamma,
                                       nll_coef=nll_coef)  # fmt: skip
    classifier_layout = check_layout(classifier_layout)
    head, positions = check_linear_head(hidden, classifier, bias, classifier_layout)
    tokens = arrays.as_array(tokens, "tokens")
    if tuple(tokens.shape) != positions or len(positions) != 2:
        raise ValueError(
            "tokens must be [B, L] (each position's next token, already shifted), with hidden "
            f"[B, L, d]; got tokens {arrays.describe(tokens)} and hidden of shape "
            f"{positions + (head.hidden.shape[-1],)}."
        )
    mask, segment_ids, num_segments = check_responses(mask, segment_ids, num_segments,
                                                      positions, "tokens'")  # fmt: skip
    layout = check_layout_name(layout)
    responses = positions[:1] if mask is not None else (positions[0], num_segments)
    num = check_pairable(responses, layout, "the batch")
    if reference is not None and reference_log_probs is not None:
        raise ValueError(
            "the reference is given twice: reference= (a reference model's hidden states and "
            "classifier) and reference_log_probs= (its precomputed sequence log-probabilities)."
            " Pass one."
        )
    given = reference is not None or reference_log_probs is not None
    check_reference_needed(options, given, "reference= or reference_log_probs=")
    vocabulary = head.classifier.shape[0 if classifier_layout == "vd" else 1]
    if reference is not None:
        reference = _reference_head(reference, positions, vocabulary, classifier_layout)
    if reference_log_probs is not None:
        reference_log_probs = _reference_pair(reference_log_probs, num)
    pairs, chosen_tokens = _known_pairs(mask, segment_ids, num_segments, layout,
                                        reference_log_probs, part=num_pairs is not None)  # fmt: skip
    num_pairs, num_chosen_tokens = check_whole_batch_counts(num_pairs, num_chosen_tokens,
                                                            options, pairs, chosen_tokens)  # fmt: skip
    return LinearPreferenceCall(mask, segment_ids, num_segments, layout, reference,
                                reference_log_probs, num_pairs, num_chosen_tokens, options)  # fmt: skip


def _known_pairs(mask, segment_ids, num_segments, layout, reference_log_probs, *, part: bool):
    """``(pairs, chosen tokens)`` counted where the mask or segment ids are known (else
    ``(None, None)``), after the pairs' checks (and the precomputed reference's counts)."""
    if not is_known(mask, segment_ids):
        return None, None
    chosen, rejected = numpy_pairs(response_counts(mask, segment_ids, num_segments), layout)
    counted = check_pair_counts(chosen, rejected, "chosen", "rejected", part=part)
    if reference_log_probs is not None:
        for policy, known, name in ((chosen, reference_log_probs[0], "chosen"),
                                    (rejected, reference_log_probs[1], "rejected")):  # fmt: skip
            check_same_counts(policy, known_counts(known, f"reference_{name}"), name)
    return counted


def _reference_head(reference, positions: tuple, vocabulary: int, layout: str) -> tuple:
    """``(hidden, classifier, bias)`` of the reference model, checked against the policy's."""
    sequences = isinstance(reference, (tuple, list)) and any(
        isinstance(x, SequenceLogProbs) for x in reference
    )
    if sequences or not isinstance(reference, (tuple, list)) or len(reference) not in (2, 3):
        hint = (
            " Precomputed sequence log-probabilities go in reference_log_probs=."
            if sequences
            else ""
        )
        raise TypeError(
            "reference must be a tuple (reference_hidden, reference_classifier) or "
            "(reference_hidden, reference_classifier, reference_bias) of a frozen reference "
            f"model; got {type(reference).__name__}"
            + (f" of length {len(reference)}" if isinstance(reference, (tuple, list)) else "")
            + f".{hint}"
        )
    hidden, classifier, bias = (*reference, None)[:3]
    head, batch = check_linear_head(hidden, classifier, bias, layout, prefix="reference_")
    if batch != positions:
        raise ValueError(
            f"reference_hidden must score the same tokens as hidden, shape {positions} + (d,); "
            f"got {arrays.describe(hidden)}."
        )
    reference_vocabulary = head.classifier.shape[0 if layout == "vd" else 1]
    if reference_vocabulary != vocabulary:
        raise ValueError(
            f"reference_classifier must have the policy's vocabulary V = {vocabulary}; got "
            f"{arrays.describe(classifier)} (V = {reference_vocabulary}, "
            f"classifier_layout={layout!r})."
        )
    return hidden, classifier, bias


def _reference_pair(reference_log_probs, num_pairs: int):
    """``(reference_chosen, reference_rejected)``, each of shape ``(P,)``."""
    if (
        not isinstance(reference_log_probs, (tuple, list))
        or len(reference_log_probs) != 2
        or isinstance(reference_log_probs, SequenceLogProbs)
    ):
        raise TypeError(
            "reference_log_probs must be a pair (reference_chosen, reference_rejected) of "
            "SequenceLogProbs, as preference_pairs returns; got "
            f"{type(reference_log_probs).__name__}."
        )
    pair = tuple(
        check_sequences(x, f"reference_log_probs' {name}")
        for x, name in zip(reference_log_probs, ("chosen", "rejected"))
    )
    for x, name in zip(pair, ("chosen", "rejected")):
        if tuple(x.total.shape) != (num_pairs,):
            raise ValueError(
                f"reference_log_probs' {name} must have shape ({num_pairs},), one response per "
                f"pair of the batch; got {arrays.describe(x.total)}."
            )
    return pair

"""``linear_preference_loss``: the preference losses from hidden states, never building logits.

DPO and its family (:func:`~jaxsoftmax.preference_loss`) need each response's summed token
log-probabilities under the policy and, for the DPO family, under a frozen reference model.
Here both come from :func:`~jaxsoftmax.linear_token_log_probs` (the fused classifier and
softmax, tile by tile), then :mod:`jaxsoftmax.core.sequence_sums` sums them per response and
pairs them, and :func:`~jaxsoftmax.preference_loss`'s computation takes the pairs: no
``[N, V]`` array exists for the policy or the reference, in the forward or the backward.
"""

from __future__ import annotations

import jax

from jaxsoftmax.checks.linear_preference_call import (
    LinearPreferenceCall,
    check_linear_preference,
)
from jaxsoftmax.checks.preference_call import PreferenceCall
from jaxsoftmax.core import sequence_sums
from jaxsoftmax.core.sequence_sums import SequenceLogProbs
from jaxsoftmax.losses.linear_token_log_probs import linear_token_log_probs
from jaxsoftmax.losses.one_program import one_program
from jaxsoftmax.losses.preference import PreferenceMetrics, preference_of_call


def linear_preference_loss(
    hidden: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike,
    *,
    mask: jax.typing.ArrayLike | None = None,
    segment_ids: jax.typing.ArrayLike | None = None,
    num_segments: int | None = None,
    layout: str = "interleaved",
    reference: tuple | None = None,
    reference_log_probs: tuple[SequenceLogProbs, SequenceLogProbs] | None = None,
    bias: jax.typing.ArrayLike | None = None,
    temperature: float = 1.0,
    classifier_layout: str = "vd",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    batch_invariant: bool = False,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    nll_coef: float | None = None,
    num_pairs: jax.typing.ArrayLike | None = None,
    num_chosen_tokens: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, PreferenceMetrics]:
    r""":func:`~jaxsoftmax.preference_loss` of a batch of responses, from the last hidden states.

    Equal, in value and gradients, to the composition from the logits::

        log_p = token_log_probs(hidden @ classifier.T + bias, tokens, where=m)
        chosen, rejected = preference_pairs(sequence_log_probs(log_p, mask=...), layout)
        preference_loss(chosen, rejected, reference_chosen=..., ...)

    (``m`` the mask, or ``segment_ids > 0``) without the ``[N, V]`` logits of either model:
    each token's ``log p`` is computed tile by tile by
    :func:`~jaxsoftmax.linear_token_log_probs`, and the backward gives each token of a
    response the pair's coefficient (``d loss / d total``) times ``(onehot - p) / T``, again
    tile by tile.

    The reference model is frozen. Given as its hidden states and classifier
    (``reference=``), its token log-probabilities are computed fused too, on
    ``jax.lax.stop_gradient`` of its arrays: the forward only, no backward pass and no
    gradient for it (its cotangents are symbolic zeros). Given as precomputed sequence
    log-probabilities (``reference_log_probs=``), they are constants.

    Args:
      hidden: float ``[B, L, d]``: the policy's last hidden states.
      classifier: float ``[V, d]`` (``[d, V]`` with ``classifier_layout="dv"``), ``hidden``'s
        dtype.
      tokens: integer ``[B, L]``: each position's next token, already shifted (position
        ``t`` scores ``tokens[t]`` with ``hidden[t]``), as
        :func:`~jaxsoftmax.linear_token_log_probs` takes them. Positions outside every
        response may hold any id.
      mask, segment_ids, num_segments: which positions belong to which response, as in
        :func:`~jaxsoftmax.sequence_log_probs` (one response per row, or packed rows).
      layout: how the responses pair up, as in :func:`~jaxsoftmax.preference_pairs`:
        ``"interleaved"`` or ``"halves"``.
      reference: None, or a frozen reference model's ``(reference_hidden,
        reference_classifier)`` or ``(reference_hidden, reference_classifier,
        reference_bias)``: the same tokens (``[B, L, d_ref]``, any width), the same
        vocabulary and ``classifier_layout``, scored at the same temperature.
      reference_log_probs: None, or its precomputed ``(reference_chosen,
        reference_rejected)``, :class:`~jaxsoftmax.SequenceLogProbs` of shape ``[P]``, as
        :func:`~jaxsoftmax.preference_pairs` returns them. Not both: the DPO family needs
        one, SimPO, ORPO and CPO take neither.
      bias: optional ``[V]``, the policy's.
      temperature, classifier_layout, token_chunk, vocab_chunk, batch_invariant: as in
        :func:`~jaxsoftmax.linear_token_log_probs`, for both models.
      loss_type, beta, label_smoothing, gamma, nll_coef, num_pairs, num_chosen_tokens: as in
        :func:`~jaxsoftmax.preference_loss`.

    Returns:
      ``(loss, metrics)``: a float32 scalar (float64 for float64 inputs) and a
      :class:`~jaxsoftmax.PreferenceMetrics`. Reverse mode.

    Example:
      >>> import jax.numpy as jnp, numpy as np, jaxsoftmax
      >>> rng = np.random.default_rng(0)
      >>> hidden = rng.normal(size=(4, 3, 8)).astype(np.float32)  # 2 pairs, interleaved
      >>> W, W_ref = rng.normal(size=(2, 16, 8)).astype(np.float32)
      >>> tokens = rng.integers(0, 16, (4, 3))
      >>> mask = np.array([[0, 1, 1]] * 4, bool)  # the first position is the prompt's
      >>> loss, metrics = linear_preference_loss(hidden, W, tokens, mask=mask,
      ...                                        reference=(hidden, W_ref))
      >>> log_p = jaxsoftmax.token_log_probs(hidden @ W.T, tokens, where=mask)
      >>> ref = jaxsoftmax.token_log_probs(hidden @ W_ref.T, tokens, where=mask)
      >>> pair = lambda x: jaxsoftmax.preference_pairs(
      ...     jaxsoftmax.sequence_log_probs(x, mask=mask))
      >>> (chosen, rejected), (ref_chosen, ref_rejected) = pair(log_p), pair(ref)
      >>> want, _ = jaxsoftmax.preference_loss(chosen, rejected, reference_chosen=ref_chosen,
      ...                                      reference_rejected=ref_rejected)
      >>> print(bool(jnp.allclose(loss, want)), metrics.pair_count)
      True 2
    """
    call = check_linear_preference(
        hidden, classifier, tokens, mask=mask, segment_ids=segment_ids,
        num_segments=num_segments, layout=layout, reference=reference,
        reference_log_probs=reference_log_probs, bias=bias, classifier_layout=classifier_layout,
        loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
        nll_coef=nll_coef, num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens,
    )  # fmt: skip
    settings = dict(temperature=temperature, classifier_layout=classifier_layout,
                    token_chunk=token_chunk, vocab_chunk=vocab_chunk,
                    batch_invariant=batch_invariant)  # fmt: skip
    return _linear_preference((hidden, classifier, bias), tokens, call, settings)


@one_program
def _linear_preference(policy, tokens, call: LinearPreferenceCall, settings: dict):
    """Both models' token log-probabilities, fused (the reference's on stop-gradient
    arrays), then the preference loss of their sums."""
    where = token_mask(call)

    def score(hidden, classifier, bias=None):
        return linear_token_log_probs(hidden, classifier, tokens, bias=bias, where=where,
                                      **settings)  # fmt: skip

    reference = None
    if call.reference is not None:
        reference = score(*jax.lax.stop_gradient(call.reference))
    return preference_of_tokens(score(*policy), reference, call)


def token_mask(call: LinearPreferenceCall):
    """The positions that belong to a response: the mask, or ``segment_ids > 0``."""
    return call.mask if call.mask is not None else call.segment_ids > 0


def preference_of_tokens(policy_log_probs, reference_log_probs, call: LinearPreferenceCall):
    """The loss and metrics of a checked fused call from the token log-probabilities ``[B,
    L]`` of the policy and of the reference (or None: the call's precomputed pair, or no
    reference)."""

    def pairs(values):
        if call.mask is not None:
            sums = sequence_sums.mask_sums(values, call.mask, values.dtype)
        else:
            sums = sequence_sums.segment_sums(values, call.segment_ids, call.num_segments,
                                              values.dtype)  # fmt: skip
        return sequence_sums.pairs(sums, call.layout)

    chosen, rejected = pairs(policy_log_probs)
    references = call.reference_log_probs or (None, None)
    if reference_log_probs is not None:
        references = pairs(reference_log_probs)
    preference = PreferenceCall(chosen, rejected, *references, call.num_pairs,
                                call.num_chosen_tokens, call.options)  # fmt: skip
    return preference_of_call(preference)

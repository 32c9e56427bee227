"""``sequence_log_probs`` and ``preference_pairs``: whole responses' log-probabilities, paired.

A response's log-probability is the sum of its tokens' (from
:func:`~jaxsoftmax.token_log_probs` or its fused forms), its length the number of its tokens;
:class:`SequenceLogProbs` holds both, and its ``mean`` the length-normalised log-probability.
:func:`preference_pairs` splits a batch of responses into the chosen and the rejected ones of
:func:`~jaxsoftmax.preference_loss`. The math is :mod:`jaxsoftmax.core.sequence_sums`, the
checks :mod:`jaxsoftmax.checks.sequence_call`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsoftmax.checks.sequence_call import (
    SequenceCall,
    check_pairs_layout,
    check_sequence_call,
)
from jaxsoftmax.core import sequence_sums
from jaxsoftmax.core.sequence_sums import SequenceLogProbs as SequenceLogProbs
from jaxsoftmax.losses.one_program import one_program


def sequence_log_probs(
    token_log_probs: jax.typing.ArrayLike,
    *,
    mask: jax.typing.ArrayLike | None = None,
    segment_ids: jax.typing.ArrayLike | None = None,
    num_segments: int | None = None,
) -> SequenceLogProbs:
    r"""Each response's summed token log-probability and its number of tokens.

    With one response per row (``mask``): ``total_b = sum_t where(m_bt, log p_bt, 0)`` and
    ``count_b = sum_t m_bt``, shape ``[B]``. With packed rows (``segment_ids``, several
    responses in a row, as a padding-free batch holds them): ``total_bs = sum_t
    where(id_bt = s, log p_bt, 0)`` and ``count_bs = sum_t [id_bt = s]`` for ``s = 1..S``,
    shape ``[B, S]``; a segment no position carries is an empty response (a padding pair
    when its partner is empty too).

    Positions that count for no response (False, or id 0) may hold anything, ``-inf`` and NaN
    included: selects, not products, keep them out of the sums and their gradient. The
    gradient of ``total`` is 1 on each of the response's tokens, of ``mean`` ``1 / count``.

    Args:
      token_log_probs: float ``[B, L]``: each position's ``log p`` of its (next) token. bf16
        and f16 are summed in float32, float64 stays float64.
      mask: bool ``[B, L]``: each row's response tokens (prompt and padding False).
      segment_ids: integer ``[B, L]``: 0 where no response is, ``1..num_segments`` for the
        row's responses. Exactly one of ``mask`` and ``segment_ids``.
      num_segments: ``S``, a Python int: the most responses a row holds (with
        ``segment_ids`` only). A segment id outside ``0..S`` raises where the ids are known;
        under ``jax.jit`` it counts for no response.

    Returns:
      A :class:`SequenceLogProbs` ``(total, count)``: float32 (float64 for float64 inputs) and
      int32, of shape ``[B]`` (``mask``) or ``[B, S]`` (``segment_ids``).

    Example:
      >>> import jax.numpy as jnp
      >>> log_p = jnp.log(jnp.array([[0.5, 0.5, 1.0], [0.25, 1.0, 0.5]]))
      >>> ids = jnp.array([[1, 1, 0], [1, 2, 2]])
      >>> sequences = sequence_log_probs(log_p, segment_ids=ids, num_segments=2)
      >>> print(sequences.count, jnp.exp(sequences.total))
      [[2 0]
       [1 2]] [[0.25 1.  ]
       [0.25 0.5 ]]
    """
    call = check_sequence_call(token_log_probs, mask=mask, segment_ids=segment_ids,
                               num_segments=num_segments)  # fmt: skip
    dtype = jnp.dtype(call.values.dtype)  # float32 or float64, else float32
    dtype = jax.dtypes.canonicalize_dtype(dtype if dtype.itemsize >= 4 else jnp.float32)
    return _sequence_log_probs(call, dtype)


@one_program
def _sequence_log_probs(call: SequenceCall, dtype):
    if call.mask is not None:
        return sequence_sums.mask_sums(call.values, call.mask, dtype)
    return sequence_sums.segment_sums(call.values, call.segment_ids, call.num_segments, dtype)


def preference_pairs(
    sequences: SequenceLogProbs, layout: str = "interleaved"
) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """The chosen and the rejected responses of a batch of pairs, in one of two layouts.

    The responses are flattened row-major (``[B]``, or ``[B, S]`` of packed rows: row 0's
    segments, then row 1's, ...), and

    * ``"interleaved"``: they alternate ``(chosen, rejected, chosen, ...)``: responses ``2p``
      and ``2p + 1`` form pair ``p`` (rows ``2p`` and ``2p + 1`` with a mask; each row's
      segments 1 and 2, 3 and 4, ... with segment ids, so ``S`` must be even);
    * ``"halves"``: TRL's concatenated batch: the first half are the chosen responses, the
      second half the rejected ones in the same order: responses ``p`` and ``P + p``.

    Any other layout raises, and so does an odd number of responses.

    Args:
      sequences: a :class:`SequenceLogProbs`, as :func:`sequence_log_probs` returns.
      layout: ``"interleaved"`` or ``"halves"``.

    Returns:
      ``(chosen, rejected)``: two :class:`SequenceLogProbs` of shape ``[P]``.

    Example:
      >>> import jax.numpy as jnp
      >>> sequences = SequenceLogProbs(jnp.array([-1.0, -2.0, -3.0, -4.0]), jnp.array([1, 2, 3, 4]))
      >>> chosen, rejected = preference_pairs(sequences, "halves")
      >>> print(chosen.total, rejected.total, rejected.count)
      [-1. -2.] [-3. -4.] [3 4]
    """
    sequences, layout = check_pairs_layout(sequences, layout)
    return _pairs(sequences, layout)


@one_program
def _pairs(sequences: SequenceLogProbs, layout: str):
    return sequence_sums.pairs(sequences, layout)

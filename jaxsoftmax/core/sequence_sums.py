"""Per-response sums of per-token values, and the pairs of chosen and rejected responses.

Preference losses score whole responses: response ``k``'s log-probability under a model is
the sum of its tokens' log-probabilities, ``S_k = sum_t [t in k] log p_t``, and its length
``n_k = sum_t [t in k]``. Two ways say which tokens are in which response:

* a bool ``mask [B, L]``: each row holds one response, its counted tokens True::

      S_b = sum_t where(m_bt, x_bt, 0),   n_b = sum_t m_bt                 mask_sums

* integer ``segment_ids [B, L]`` (packed rows: several responses in one row): ``0`` marks
  positions that count for no response (prompts, padding), ``1..S`` the row's responses::

      S_bs = sum_t where(id_bt = s, x_bt, 0),   n_bs = sum_t [id_bt = s]   segment_sums

Selects, not products, so a position that counts for no response may hold ``-inf`` or NaN
and reaches neither the sums nor their gradient. The responses, flattened row-major, then
form the pairs (:func:`interleaved_pairs`, :func:`halved_pairs`). No argument checks here
(:mod:`jaxsoftmax.checks.sequence_call` checks first).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LAYOUTS = ("interleaved", "halves")


class SequenceLogProbs(NamedTuple):
    """Each response's summed token log-probability and its number of tokens.

    Attributes:
      total: ``sum_t log p_t`` over the response's counted tokens, float32 (float64 for
        float64 inputs); 0 for a response with no token.
      count: its number of counted tokens ``n``, int32.
    """

    total: jax.Array
    count: jax.Array

    @property
    def mean(self) -> jax.Array:
        """The length-normalised log-probability ``total / max(count, 1)`` (0 with no token)."""
        return self.total / jnp.maximum(self.count, 1).astype(self.total.dtype)


def mask_sums(values, mask, dtype) -> SequenceLogProbs:
    """``(S_b, n_b)`` of shape ``[B]``: each row's sum of ``values [B, L]`` where ``mask``."""
    total = jnp.sum(jnp.where(mask, values.astype(dtype), jnp.zeros((), dtype)), axis=-1)
    return SequenceLogProbs(total, jnp.sum(mask, axis=-1, dtype=jnp.int32))


def segment_sums(values, segment_ids, num_segments: int, dtype) -> SequenceLogProbs:
    """``(S_bs, n_bs)`` of shape ``[B, S]``: each row's sum of ``values [B, L]`` per segment
    ``s = 1..S`` (ids outside ``1..S`` count for none). The ``[B, L, S]`` one-hot is a
    select inside one reduction, which XLA fuses without writing it out."""
    segments = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype).reshape(1, 1, -1)
    member = segment_ids[:, :, None] == segments
    values = values.astype(dtype)[:, :, None]
    total = jnp.sum(jnp.where(member, values, jnp.zeros((), dtype)), axis=1)
    return SequenceLogProbs(total, jnp.sum(member, axis=1, dtype=jnp.int32))


def _flat(sequences: SequenceLogProbs) -> SequenceLogProbs:
    return SequenceLogProbs(sequences.total.reshape(-1), sequences.count.reshape(-1))


def interleaved_pairs(sequences: SequenceLogProbs) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """``(chosen, rejected)`` of the responses flattened row-major as ``(chosen, rejected,
    chosen, ...)``: responses ``2p`` and ``2p + 1`` form pair ``p``."""
    flat = _flat(sequences)
    return (SequenceLogProbs(*(x[0::2] for x in flat)),
            SequenceLogProbs(*(x[1::2] for x in flat)))  # fmt: skip


def halved_pairs(sequences: SequenceLogProbs) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """``(chosen, rejected)`` of the responses flattened row-major, the first half chosen and
    the second half rejected in the same order (TRL's concatenated batch): responses ``p``
    and ``P + p`` form pair ``p``."""
    flat = _flat(sequences)
    half = flat.total.shape[0] // 2
    return (SequenceLogProbs(*(x[:half] for x in flat)),
            SequenceLogProbs(*(x[half:] for x in flat)))  # fmt: skip


def pairs(sequences: SequenceLogProbs, layout: str):
    """``(chosen, rejected)``, each ``[P]``, in ``layout`` (``"interleaved"`` or ``"halves"``)."""
    return (interleaved_pairs if layout == "interleaved" else halved_pairs)(sequences)

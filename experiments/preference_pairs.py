"""Preference pairs cut from text without a human, for ``preference.py``.

A pair is a prompt and two responses of the same length:

- the prompt: ``prompt_tokens`` consecutive tokens of one file of the token stream
  (``text_corpus.py``), at a start drawn at random among the windows that hold no end of a
  file;
- chosen: the next ``response_tokens`` tokens of the same file, the text's true continuation;
- rejected, as ``rejected`` says:

  - ``"sample"``: the language model's own continuation of the prompt, drawn at temperature
    ``T`` by ``sampling.py`` (every one of the ``response_tokens`` tokens: no stop at a line's
    end). The rejected response is what the model writes, the chosen what it should have
    written: SPIN's pairs (Chen et al. 2024, *Self-Play Fine-Tuning Converts Weak Language
    Models to Strong Language Models*), which asks only for text, no labels;
  - ``"shuffled"``: the true continuation with its tokens in a random order (the same tokens,
    only their order wrong; drawn again while it equals the original, and a window whose
    continuation is one token repeated is never drawn). Free, but a negative the model
    already tells from text: its log-probability is far below the truth's;
  - ``"mix"``: the pairs of even index sampled, those of odd index shuffled.

The sampled responses come from the model the run starts from (the reference), once, before
training: the pairs are a fixed set (offline DPO, as TRL trains on a dataset). Everything is
drawn from the ``seed`` the caller gives, so a resumed run rebuilds the same pairs bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import grpo_training
import jax
import jax.numpy as jnp
import numpy as np
import sampling

REJECTED = ("sample", "shuffled", "mix")
SAMPLE_CHUNK = 64  # prompts sampled at once: one compiled shape, bounded memory


class Pairs(NamedTuple):
    """``n`` preference pairs.

    Attributes:
      prompts: int32 ``[n, P]``.
      chosen: int32 ``[n, N]``, the true continuations.
      rejected: int32 ``[n, N]``.
      sampled: bool ``[n]``: the rejected response is the model's sample (else shuffled).
    """

    prompts: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    sampled: np.ndarray

    def __len__(self) -> int:
        return len(self.prompts)

    def identical(self) -> int:
        """How many pairs' responses are the same tokens (a sample that is the truth)."""
        return int(np.all(self.chosen == self.rejected, axis=1).sum())


def cut_windows(
    stream: np.ndarray, *, count: int, length: int, tail: int, end_of_text: int, seed: int
) -> np.ndarray:
    """``[count, length]``: windows of ``stream`` at distinct starts drawn at random (from
    ``seed``) among those holding no end-of-text token and whose last ``tail`` tokens are
    not one token repeated. ``ValueError`` when fewer qualify."""
    ends = np.concatenate([[0], np.cumsum(stream == end_of_text)])
    starts = np.arange(stream.size - length + 1)
    whole = ends[starts + length] == ends[starts]  # no end of a file inside
    # changes[i]: the positions j <= i whose token differs from the one before.
    changes = np.concatenate([[0], np.cumsum(stream[1:] != stream[:-1])])
    varied = changes[starts + length - 1] > changes[starts + length - tail]
    candidates = starts[whole & varied]
    if candidates.size < count:
        raise ValueError(
            f"the stream of {stream.size} tokens has {candidates.size} windows of {length} "
            f"tokens within one file; {count} were asked for."
        )
    chosen = np.random.default_rng(seed).choice(candidates, count, replace=False)
    return stream[chosen[:, None] + np.arange(length)]


def shuffled(responses: np.ndarray, seed: int) -> np.ndarray:
    """Each row of ``responses`` with its tokens in a random order, drawn again while it is
    the row itself (every row must hold two distinct tokens)."""
    random = np.random.default_rng(seed)
    out = responses.copy()
    for row, original in zip(out, responses, strict=True):
        while np.array_equal(row, original):
            row[:] = random.permutation(original)
    return out


@functools.lru_cache(maxsize=4)
def sampler(num_heads: int, response_tokens: int, temperature: float, vocab_size: int):
    """The jitted ``(params, prompts [n, P], key) -> sampling.Completions`` drawing
    ``response_tokens`` tokens each (no token ends a response)."""
    return sampling.make_sampler(
        num_heads=num_heads,
        max_new_tokens=response_tokens,
        temperature=temperature,
        ends_line=np.zeros(vocab_size, bool),
        score=grpo_training.token_scores("fused", temperature),
    )


def own_samples(
    params, prompts: np.ndarray, key: jax.Array, *, num_heads: int, response_tokens: int,
    temperature: float,
) -> np.ndarray:  # fmt: skip
    """int32 ``[n, N]``: the model's continuation of each prompt, sampled
    :data:`SAMPLE_CHUNK` prompts at a time (the last chunk padded), chunk ``c`` with the key
    ``fold_in(key, c)``."""
    vocab_size = int(params["embedding"].shape[0])
    sample = sampler(num_heads, response_tokens, temperature, vocab_size)
    count = len(prompts)
    padded = -count % SAMPLE_CHUNK
    prompts = np.concatenate([prompts, np.repeat(prompts[-1:], padded, axis=0)])
    pieces = []
    for c, first in enumerate(range(0, len(prompts), SAMPLE_CHUNK)):
        chunk = jnp.asarray(prompts[first : first + SAMPLE_CHUNK])
        pieces.append(np.asarray(sample(params, chunk, jax.random.fold_in(key, c)).tokens))
    return np.concatenate(pieces)[:count]


def make_pairs(
    stream: np.ndarray,
    *,
    count: int,
    prompt_tokens: int,
    response_tokens: int,
    rejected: str,
    end_of_text: int,
    seed: int,
    sample: Callable[[np.ndarray, jax.Array], np.ndarray],
) -> Pairs:
    """``count`` pairs cut from ``stream`` (see the module's docstring); ``sample(prompts,
    key) -> responses`` writes the model's continuations (:func:`own_samples` with the
    model)."""
    if rejected not in REJECTED:
        raise ValueError(f"rejected={rejected!r} is not known; expected one of {REJECTED}.")
    windows = cut_windows(
        stream, count=count, length=prompt_tokens + response_tokens, tail=response_tokens,
        end_of_text=end_of_text, seed=seed,
    )  # fmt: skip
    prompts, chosen = windows[:, :prompt_tokens], windows[:, prompt_tokens:]
    sampled = np.full(count, rejected == "sample")
    if rejected == "mix":
        sampled = np.arange(count) % 2 == 0
    responses = shuffled(chosen, seed + 1)
    if sampled.any():
        key = jax.random.fold_in(jax.random.key(seed), 2)
        responses[sampled] = sample(prompts[sampled], key)
    return Pairs(
        prompts.astype(np.int32), chosen.astype(np.int32), responses.astype(np.int32), sampled
    )

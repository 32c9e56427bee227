"""Sampling completions from the transformer of ``transformer.py``, each token scored as the
trainer will score it.

For prompts ``[B, P]`` the sampler draws ``N`` tokens one at a time from the policy
``softmax(z / T)``. At draw ``t`` the model reads the whole sequence buffer ``[B, P + N - 1]``
(the prompt, the ``t`` tokens drawn so far, zeros after them) and the next token is drawn from
the logits at position ``P + t - 1``. Reading the whole buffer each time costs ``N`` forward
passes of the full length, where a key-value cache would cost one; in return every draw runs
the program the trainer runs, on the same shape: causal attention gives a position the same
numbers whatever the later positions hold (their scores are replaced by ``-inf``, their
weights are exact zeros), so position ``P + t - 1``'s hidden state is the trainer's, bit for
bit (on this CPU: tests/test_reinforce.py compares them, and every first update of the
committed run in experiments/results/reinforce/ had ratios of exactly 1).

The sampled token's log-probability is then computed by ``score``, the function the trainer
uses (``jaxsoftmax.linear_token_log_probs(..., batch_invariant=True)``, whose results for a
row do not depend on the batch it is in): the importance ratio ``exp(log p - log p_old)`` of
the trainer's first update on these tokens is then exactly 1.

A completion ends with its first line-ending token (``ends_line``); its ``mask`` holds the
tokens up to and including that one. Drawing continues after it, to keep the shape fixed; the
tokens drawn after the end are not part of the completion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import transformer

# ``score(hidden [..., d], classifier [V, d], tokens [...]) -> (log p [...], entropy [...])``.
Score = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class Completions(NamedTuple):
    """What the sampler returns for ``B`` prompts.

    Attributes:
      tokens: int32 ``[B, N]``, the drawn tokens.
      log_probs: float32 ``[B, N]``, ``log p`` of each under the sampling policy, by ``score``.
      entropy: float32 ``[B, N]``, the sampling policy's entropy at each draw.
      mask: bool ``[B, N]``: the completion's tokens, up to and including the one ending it.
      ended: bool ``[B]``: whether the completion ended its line within the ``N`` tokens.
    """

    tokens: jax.Array
    log_probs: jax.Array
    entropy: jax.Array
    mask: jax.Array
    ended: jax.Array


def model_inputs(prompts: jax.Array, completions: jax.Array) -> jax.Array:
    """``[B, P + N - 1]``: the tokens the model reads to score ``completions [B, N]`` after
    ``prompts [B, P]`` (every token but the last)."""
    return jnp.concatenate([prompts, completions[:, :-1]], axis=1)


def completion_states(hidden: jax.Array, prompt_tokens: int) -> jax.Array:
    """The hidden states ``[B, N, d]`` that predict the completion's tokens: those of the
    positions ``P - 1 .. P + N - 2`` of the model's ``[B, P + N - 1, d]``."""
    return hidden[:, prompt_tokens - 1 :]


def make_sampler(
    *, num_heads: int, max_new_tokens: int, temperature: float, ends_line: np.ndarray,
    score: Score,
) -> Callable[[dict, jax.Array, jax.Array], Completions]:  # fmt: skip
    """A jitted ``(params, prompts [B, P], key) -> Completions`` drawing ``max_new_tokens``
    tokens at ``temperature``; draw ``t`` uses the key ``fold_in(key, t)``."""
    ends_line = jnp.asarray(ends_line)

    def sample(params, prompts: jax.Array, key: jax.Array) -> Completions:
        batch, prompt_tokens = prompts.shape
        classifier = transformer.classifier(params)
        zeros = jnp.zeros((batch, max_new_tokens), jnp.float32)
        carry = (
            jnp.zeros((batch, max_new_tokens), jnp.int32),  # the tokens drawn so far
            zeros,  # their log-probabilities
            zeros,  # the entropy at each draw
            jnp.zeros((batch, max_new_tokens), bool),  # the completion's mask
            jnp.zeros((batch,), bool),  # the completion has ended
        )

        def draw(t, carry):
            tokens, log_probs, entropy, mask, ended = carry
            inputs = model_inputs(prompts, tokens)
            hidden = transformer.hidden_states(params, inputs, num_heads=num_heads)
            state = jax.lax.dynamic_index_in_dim(hidden, prompt_tokens - 1 + t, 1, False)
            logits = state @ classifier.T  # [B, V]: the draw's own, small
            token = jax.random.categorical(jax.random.fold_in(key, t), logits / temperature)
            token = token.astype(jnp.int32)
            log_p, h = score(state, classifier, token)
            column = lambda array, value: jax.lax.dynamic_update_index_in_dim(array, value, t, 1)
            return (
                column(tokens, token),
                column(log_probs, log_p),
                column(entropy, h),
                column(mask, ~ended),
                ended | ends_line[token],
            )

        tokens, log_probs, entropy, mask, ended = jax.lax.fori_loop(0, max_new_tokens, draw, carry)
        return Completions(tokens, log_probs, entropy, mask, ended)

    return jax.jit(sample)

"""The derived math: the softmax cross-entropy rule and the terms it is made of.

No argument checks here (the public losses check first, in :mod:`jaxsoftmax.checks`); plain
JAX, the program a GPU or TPU compiles, with XLA's CPU backend given equal programs when a
program is lowered for it. Modules, read in this order:

* :mod:`~jaxsoftmax.core.rule`: the softmax cross-entropy ``custom_vjp`` / ``custom_jvp``,
  ``dL/dz = softmax(z) - q`` with the options' terms (docs/derivation.md, sections 1-7).
* :mod:`~jaxsoftmax.core.row_terms`: the named quantities the rule composes (row statistics,
  target vector, row loss, the backward expression), also used tile by tile by
  :mod:`jaxsoftmax.tiles`.
* :mod:`~jaxsoftmax.core.companion_terms`: ``lse``, entropy and correctness per row
  (``return_aux``) and their rule (section 8).
* :mod:`~jaxsoftmax.core.divergences`: the distillation rule, three divergences between two
  softmaxes and both logits' gradients (section 9).
* :mod:`~jaxsoftmax.core.token_terms`: each token's log-probability and the entropy under a
  temperature, and their rule (section 10); :mod:`~jaxsoftmax.core.policy_objectives`: the
  policy-gradient terms of reinforcement learning.
* :mod:`~jaxsoftmax.core.sequence_sums`: per-response sums of per-token values and their
  pairing; :mod:`~jaxsoftmax.core.preference_objectives`: DPO and its family, one loss type
  per function (section 11).
* :mod:`~jaxsoftmax.core.cpu_programs`: the equal programs for XLA's CPU backend, chosen by
  ``jax.lax.platform_dependent``; :func:`plain_path_only` turns them off (tests, benchmarks).
* :mod:`~jaxsoftmax.core.tpu_programs`: what the fused loss's float32 chunks become on XLA's
  TPU backend; :mod:`~jaxsoftmax.core.chunks` chooses the chunk slice per platform.
* :mod:`~jaxsoftmax.core.varying_axes`: how ``shard_map`` types the values the rules return.
"""

from jaxsoftmax.core.cpu_programs import plain_path_only as plain_path_only

__all__ = ["plain_path_only"]

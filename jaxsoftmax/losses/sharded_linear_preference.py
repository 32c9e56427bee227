"""``sharded_linear_preference_loss``: the fused preference losses, vocabulary split.

:func:`jaxsoftmax.linear_preference_loss` with both models' token log-probabilities from
:func:`jaxsoftmax.sharded_linear_token_log_probs`: the policy's classifier, and the reference
model's likewise, split by vocabulary over a mesh axis (and the tokens over another), each
device running the tiles over its own classes; only per-token statistics cross devices. The
per-response sums, the pairs and the loss then take ``[B, L]`` arrays.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from jaxsoftmax.checks.linear_preference_call import (
    LinearPreferenceCall,
    check_linear_preference,
)
from jaxsoftmax.checks.mesh_axes import AxisName
from jaxsoftmax.core.sequence_sums import SequenceLogProbs
from jaxsoftmax.losses.linear_preference import preference_of_tokens, token_mask
from jaxsoftmax.losses.one_program import one_program
from jaxsoftmax.losses.preference import PreferenceMetrics
from jaxsoftmax.losses.sharded_linear_token_log_probs import sharded_linear_token_log_probs


def sharded_linear_preference_loss(
    hidden: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike,
    *,
    mesh: Mesh,
    class_axis_name: AxisName,
    batch_axis_name: AxisName | None = None,
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
    r""":func:`~jaxsoftmax.linear_preference_loss` with the classifiers split by vocabulary.

    The policy's ``classifier`` ``[V, d]`` is split by rows over ``class_axis_name``
    (``[d, V]`` with ``classifier_layout="dv"``: by columns), ``bias`` likewise, and the
    reference model's classifier and bias the same way; with ``batch_axis_name`` the tokens
    are split over it (``B L`` must divide by its size). Values and gradients equal the
    single-device function's; the classifier's gradient comes back split like it. The
    reference gets no gradient and no backward pass.

    Args:
      hidden, classifier, tokens, mask, segment_ids, num_segments, layout, reference,
        reference_log_probs, bias, temperature, classifier_layout, token_chunk, vocab_chunk,
        batch_invariant, loss_type, beta, label_smoothing, gamma, nll_coef, num_pairs,
        num_chosen_tokens: as in :func:`~jaxsoftmax.linear_preference_loss`; the chunks tile
        each device's share.
      mesh: the ``jax.sharding.Mesh``.
      class_axis_name: the mesh axis (or axes) the vocabulary is split over.
      batch_axis_name: the mesh axis (or axes) the tokens are split over, or None.

    Returns:
      ``(loss, metrics)``, as :func:`~jaxsoftmax.linear_preference_loss`.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxsoftmax
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
      >>> rng = np.random.default_rng(0)
      >>> hidden = rng.normal(size=(4, 3, 8)).astype(np.float32)
      >>> W = rng.normal(size=(16, 8)).astype(np.float32)
      >>> tokens = rng.integers(0, 16, (4, 3))
      >>> options = dict(mask=np.ones((4, 3), bool), loss_type="simpo", beta=2.0)
      >>> loss, _ = sharded_linear_preference_loss(hidden, W, tokens, mesh=mesh,
      ...                                          class_axis_name="vocab", **options)
      >>> want, _ = jaxsoftmax.linear_preference_loss(hidden, W, tokens, **options)
      >>> print(bool(jnp.allclose(loss, want)))
      True
    """
    call = check_linear_preference(
        hidden, classifier, tokens, mask=mask, segment_ids=segment_ids,
        num_segments=num_segments, layout=layout, reference=reference,
        reference_log_probs=reference_log_probs, bias=bias, classifier_layout=classifier_layout,
        loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
        nll_coef=nll_coef, num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens,
    )  # fmt: skip
    settings = dict(mesh=mesh, class_axis_name=class_axis_name, batch_axis_name=batch_axis_name,
                    temperature=temperature, classifier_layout=classifier_layout,
                    token_chunk=token_chunk, vocab_chunk=vocab_chunk,
                    batch_invariant=batch_invariant)  # fmt: skip
    return _sharded_linear_preference((hidden, classifier, bias), tokens, call, settings)


@one_program
def _sharded_linear_preference(policy, tokens, call: LinearPreferenceCall, settings: dict):
    """Both models' token log-probabilities on the mesh (the reference's on stop-gradient
    arrays), then the preference loss of their sums."""
    where = token_mask(call)

    def score(hidden, classifier, bias=None):
        return sharded_linear_token_log_probs(hidden, classifier, tokens, bias=bias,
                                              where=where, **settings)  # fmt: skip

    reference = None
    if call.reference is not None:
        reference = score(*jax.lax.stop_gradient(call.reference))
    return preference_of_tokens(score(*policy), reference, call)

"""Drop-in replacements for optax's softmax cross-entropy losses.

Same positional signatures, output shapes and semantics as
``optax.softmax_cross_entropy`` and ``optax.softmax_cross_entropy_with_integer_labels``
(``axis`` an int or a tuple of ints, ``where`` per example or per logit), so research code
switches its import and nothing else. Differences are deliberate and documented:

* fully masked rows give 0 and zero, finite gradients for the logits *and* the probability
  labels (optax also gives 0 and a zero logits gradient there, but its gradient with
  respect to the labels is NaN on such rows, checked with optax 0.2.8);
* nothing is broadcast: ``labels`` must match the documented shape exactly;
* the gradient is the hand-derived rule, and these names also support forward mode
  (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) through a ``custom_jvp`` whose tangent is
  that same rule's gradient dotted with the input tangent (see docs/custom-gradients.md).
"""

from __future__ import annotations

import jax

from jaxsoftmax.checks.logits_call import check_logits_call
from jaxsoftmax.checks.mesh_axes import check_mapped_axis
from jaxsoftmax.losses.cross_entropy import per_example_loss

Axis = int | tuple[int, ...] | None


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    axis_name=None,
) -> jax.Array:
    r"""Softmax cross-entropy against probability labels, per example.

    .. math::

       \ell_n = -\sum_c y_{nc} \log \mathrm{softmax}(z_n)_c,
       \qquad \frac{\partial \ell_n}{\partial z_n} = \mathrm{softmax}(z_n) \textstyle\sum_c y_{nc}
         - y_n,
       \qquad \frac{\partial \ell_n}{\partial y_n} = -\log \mathrm{softmax}(z_n).

    The gradient with respect to ``labels`` is the true one, so the loss serves
    distillation (soft teacher targets).

    Args:
      logits: float ``[..., num_classes]``.
      labels: float probabilities with the logits' shape.
      axis: class axis or axes (None: all axes, giving a scalar).
      where: bool, one value per example or the logits' shape (classes taking part).
      axis_name: mapped axis the class axis is split over (vocabulary parallel), or None.

    Returns:
      The loss per example, shape of ``logits`` without ``axis``, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsoftmax import softmax_cross_entropy
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print([f"{loss:.4f}" for loss in softmax_cross_entropy(logits, labels)])
      ['0.2761', '2.9518']
    """
    return _per_example(
        logits, labels, axis_name, axis=axis, where=where, allow_none_axis=True,
        targets_kind="probabilities",
        kind_hint=" For class indices use softmax_cross_entropy_with_integer_labels.",
    )  # fmt: skip


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    axis_name=None,
    checked: bool = False,
) -> jax.Array:
    r"""Softmax cross-entropy against integer class labels, per example.

    .. math::

       \ell_n = \mathrm{logsumexp}(z_n) - z_{n, y_n},
       \qquad \frac{\partial \ell_n}{\partial z_n} = \mathrm{softmax}(z_n) - \mathrm{onehot}(y_n).

    Args:
      logits: float ``[..., num_classes]``.
      labels: integers of the logits' shape without ``axis``; with a tuple ``axis`` a label
        is the row-major flat index into the class axes.
      axis: class axis or tuple of axes.
      where: bool, one value per example or the logits' shape (classes taking part in the
        normalizer; the label's own logit always counts, as in optax).
      axis_name: mapped axis the class axis is split over (vocabulary parallel), or None.
      checked: raise on labels out of range, naming the label and its position: a
        ``ValueError`` before any computation when the labels are known in Python (an eager
        call); when they are traced (under ``jit``), a checkify check that needs
        :func:`jaxsoftmax.checked` as the *outermost* wrapper,
        ``jaxsoftmax.checked(jax.jit(f))`` (``jax.jit(jaxsoftmax.checked(f))`` fails).

    Returns:
      The loss per example, in the logits' dtype. A label out of range gives NaN for its
      example (it cannot raise under ``jit``; use ``checked=True``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsoftmax import softmax_cross_entropy_with_integer_labels
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> losses = softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
      >>> print([f"{loss:.4f}" for loss in losses])
      ['0.2761', '2.9518']
    """
    return _per_example(
        logits, labels, axis_name, axis=axis, where=where, checked=checked,
        targets_kind="indices", kind_hint=" For probabilities use softmax_cross_entropy.",
        label_hint=" Leave an example out with where=.",
    )  # fmt: skip


def _per_example(logits, labels, axis_name, **check):
    """Each example's loss through the rule's forward-capable form (a ``custom_jvp``), after
    the checks (``check``: the call's arguments and the messages' wording)."""
    check_mapped_axis(axis_name)
    call = check_logits_call(
        logits, labels, sharded=axis_name is not None, targets_name="labels", **check
    )
    loss, _ = per_example_loss(call, axis_name=axis_name, forward_mode=True)
    return loss.astype(call.logits.dtype)

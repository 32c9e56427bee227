"""The linear head of the fused losses, checked once: hidden states, classifier and bias.

Every fused loss (:func:`~jaxsoftmax.linear_cross_entropy`, the distillation losses' student
and teacher, their sharded forms) takes a model's last layer as ``hidden [..., d]``, a
``classifier`` of layout ``"vd"`` (``[V, d]``, a tied embedding table) or ``"dv"``
(``[d, V]``, a Dense kernel) and an optional ``bias [V]``. :func:`check_linear_head` checks
them and returns one :class:`LinearHead` with the tokens flattened to ``[N, d]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class LinearHead(NamedTuple):
    """One model's last layer, checked: ``hidden [N, d]`` (tokens flattened), ``classifier``
    (``[V, d]`` or ``[d, V]``) and ``bias [V]`` or None."""

    hidden: jax.Array
    classifier: jax.Array
    bias: jax.Array | None

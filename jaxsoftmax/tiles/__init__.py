"""The fused engine: losses of a linear layer's logits computed tile by tile, never whole.

* :mod:`~jaxsoftmax.tiles.plan` and :mod:`~jaxsoftmax.tiles.sizes`: which ``[T, Vc]`` tile
  of logits is computed, chosen per backend when the program is lowered;
* :mod:`~jaxsoftmax.tiles.cross_entropy` (with its ``_forward`` and ``_backward`` modules):
  the fused cross-entropy's ``custom_vjp``, an online log-sum-exp and the core's rule tile
  by tile; :mod:`~jaxsoftmax.tiles.forward_gradient`: its ``method="forward"``;
* :mod:`~jaxsoftmax.tiles.distillation` (with ``_plan``, ``_forward``, ``_backward`` and
  :mod:`~jaxsoftmax.tiles.online`): the same for two models and a divergence;
* :mod:`~jaxsoftmax.tiles.mesh`: the mesh runner every sharded loss shares.

:func:`auto_method` is what ``linear_cross_entropy(method="auto")`` chooses for a shape
(the benchmark reports it).
"""

from jaxsoftmax.tiles.forward_gradient import auto_method as auto_method

__all__ = ["auto_method"]

"""Every argument check, once: the public losses check here, and nothing below checks again.

A public loss calls one function of this layer, which raises a clear exception (naming the
argument, what was given, what was expected) before any computation, and returns the call
as one value that the layers below take instead of twenty keywords:

* :mod:`~jaxsoftmax.checks.logits_call`: losses on given logits
  (:func:`~jaxsoftmax.cross_entropy`, the optax drop-ins, the sharded loss) ->
  :class:`~jaxsoftmax.checks.logits_call.LogitsCall`;
* :mod:`~jaxsoftmax.checks.linear_call`: the fused cross-entropy ->
  :class:`~jaxsoftmax.checks.linear_call.LinearCall`;
* :mod:`~jaxsoftmax.checks.distillation_call`: both distillation losses;
* :mod:`~jaxsoftmax.checks.token_call`, :mod:`~jaxsoftmax.checks.policy_call`: the token
  log-probabilities and the policy-gradient loss;
* :mod:`~jaxsoftmax.checks.sequence_call`, :mod:`~jaxsoftmax.checks.preference_call`,
  :mod:`~jaxsoftmax.checks.linear_preference_call`: sequence log-probabilities, their pairs,
  and the preference losses on them or on hidden states;
* :mod:`~jaxsoftmax.checks.linear_head`: a model's last layer (hidden, classifier, bias,
  layout) and the tiling, shared by every fused loss;
* :mod:`~jaxsoftmax.checks.options`: the loss options every loss shares
  (:class:`~jaxsoftmax.checks.options.LossOptions`);
* :mod:`~jaxsoftmax.checks.arrays`: shapes, dtypes, axes and numbers;
* :mod:`~jaxsoftmax.checks.mesh_axes`: the sharded losses' mesh arguments;
* :mod:`~jaxsoftmax.checks.checked_mode`: ``checked=True``'s label range checks, in Python
  or staged under ``jit`` (:func:`jaxsoftmax.checked`).
"""

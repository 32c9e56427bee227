"""``sharded_linear_cross_entropy``: the fused classifier + loss with a vocabulary-split classifier.

The classifier ``[V, d]`` (or ``[d, V]``) is split by vocabulary rows over a mesh axis
and, optionally, the tokens by batch over another. Each device runs
:func:`jaxsoftmax.linear_cross_entropy`'s chunked loop over its own ``V / S`` classes
(``axis_name`` in its plan) and the devices combine per-row statistics only: one ``pmax``
of the running maxima, then one ``psum`` of the rescaled sums of exponentials, the label
logits (from the shard that owns each label) and, with label smoothing, the smoothing sums.
No ``[N, V]`` array exists anywhere, on any device.

The backward is :func:`jaxsoftmax.linear_cross_entropy`'s, on each device's own classes:
the classifier's and bias's gradients land sharded like the classifier. The gradient with
respect to the hidden states is a sum over the vocabulary shards (each shard's classes
contribute ``G W_shard``): ``shard_map`` adds the shards' ``[N / B, d]`` partial sums
with one all-reduce, as in every tensor-parallel matrix product. That is the only
collective whose size does not depend on ``N`` alone; see docs/scaling.md.

The class weights are the global ``[V]`` vector on every device (``V`` numbers, small
next to the ``V x d`` classifier), so ``w[label]`` and ``sum_c w_c`` need no communication.
A vocabulary that does not divide by the number of class shards is padded: the
*classifier* gets zero rows (``[pad, d]``, cheap) that the loss masks out of every sum
and whose gradient is 0; the logits are never padded because they never exist.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsoftmax.checks import arrays
from jaxsoftmax.checks.linear_call import LinearCall, check_linear_call
from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.checks.mesh_axes import AxisName, check_tokens_divide, mesh_axes
from jaxsoftmax.core.companion_terms import LossAux
from jaxsoftmax.core.reduction import reduce_loss
from jaxsoftmax.losses.linear_cross_entropy import linear_cross_entropy
from jaxsoftmax.losses.mesh_options import array_options, takes_options_of
from jaxsoftmax.tiles import cross_entropy as fused
from jaxsoftmax.tiles.mesh import (
    MeshLayout,
    head_inputs,
    local_head,
    on_explicit_axes,
    pad_classes,
    run_sharded,
    vocabulary_split,
)


@takes_options_of(linear_cross_entropy, excluded=("method", "gradient_filter"))
def sharded_linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    mesh: Mesh,
    class_axis_name: AxisName,
    batch_axis_name: AxisName | None = None,
    return_aux: bool = False,
    **options,
) -> jax.Array | tuple[jax.Array, LossAux]:
    r""":func:`~jaxsoftmax.linear_cross_entropy` with the classifier split by vocabulary rows.

    Runs the fused loss under ``jax.shard_map``: ``classifier`` ``[V, d]`` is split by rows
    over ``class_axis_name`` (``P(class, None)``; ``[d, V]`` with
    ``classifier_layout="dv"``: ``P(None, class)``), ``bias`` ``P(class)``, and with
    ``batch_axis_name`` the tokens are split over it (``hidden`` ``P(batch, None)``,
    ``labels`` and ``where`` ``P(batch)``). Only per-row statistics cross devices in the
    loss; the hidden states' gradient is the one ``[N / B, d]`` sum over the vocabulary
    shards that any vocabulary-parallel classifier needs.

    The value and the gradients equal those of the single-device
    ``linear_cross_entropy(hidden, classifier, labels, ...)`` with the same options:
    labels are global class indices, label smoothing spreads over all ``V`` classes,
    ``class_weights`` is the global ``[V]`` vector, reductions are global over the batch
    shards. The classifier's and bias's gradients come back split like them.

    Args:
      hidden: float ``[..., d]``; the tokens (all leading axes, flattened) are split over
        ``batch_axis_name``, so their number must divide by its size.
      classifier: float ``[V, d]`` or ``[d, V]`` (see ``classifier_layout``).
      labels: integer class indices, ``hidden``'s shape without ``d``.
      mesh: the ``jax.sharding.Mesh`` (axes ``Auto`` or ``Explicit``).
      class_axis_name: the mesh axis (or tuple of axes) the vocabulary is split over.
      batch_axis_name: the mesh axis (or axes) the tokens are split over, or None.
      bias, where, ignore_index, label_smoothing, class_weights, z_loss, logit_softcap,
        reduction, classifier_layout, token_chunk, vocab_chunk, accumulation_dtype,
        return_aux, vocab_mask: as in :func:`~jaxsoftmax.linear_cross_entropy`; the chunks tile each
        device's ``[N / B, V / S]`` share. The companions need per-row numbers only: each
        shard's running sums and largest logit, combined like the loss's statistics.

    Returns:
      The reduced loss (a scalar, replicated), or with ``reduction="none"`` the per-token
      losses (``hidden``'s shape without ``d``), split over ``batch_axis_name``; with
      ``return_aux`` also the :class:`~jaxsoftmax.LossAux`, split like the tokens.

    ``V`` need not divide by the number of class shards: the classifier (and bias) get
    zero rows up to the next multiple, masked out of the loss. If the classifier already
    lives sharded on the mesh that padding moves it; keep ``V`` a multiple of the shard
    count (pad the embedding table, as large models do) to avoid it.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jaxsoftmax import linear_cross_entropy
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
      >>> h = jax.random.normal(jax.random.key(0), (6, 4))
      >>> W = jax.random.normal(jax.random.key(1), (10, 4))
      >>> y = jnp.array([0, 3, 9, 2, 2, 7])
      >>> loss = sharded_linear_cross_entropy(h, W, y, mesh=mesh, class_axis_name="vocab")
      >>> print(bool(jnp.allclose(loss, linear_cross_entropy(h, W, y), atol=1e-6)))
      True
    """
    class_names, batch_names = mesh_axes(mesh, class_axis_name, batch_axis_name)
    return_aux = arrays.check_flag(return_aux, "return_aux")
    # The single-device checks and messages, on the global arrays.
    call = check_linear_call(hidden, classifier, labels, **options)
    check_tokens_divide(call.head.hidden.shape[0], mesh, batch_names, batch_axis_name,
                        "hidden's leading axes, flattened")  # fmt: skip
    inputs = (hidden, classifier, labels, array_options(options))
    layout = MeshLayout(mesh, class_names, batch_names, on_explicit_axes(mesh, inputs))
    arrays_of_call = (call.head, call.labels, call.class_weights, call.row_mask, call.vocab_mask)
    settings = call._replace(
        head=None, labels=None, class_weights=None, row_mask=None, vocab_mask=None
    )
    out = _sharded_loss(*arrays_of_call, settings=settings, layout=layout, return_aux=return_aux)
    out, aux = out if return_aux else (out, None)
    if call.options.reduction == "none":
        out = out.reshape(call.batch)
    out = out.astype(call.head.hidden.dtype)
    if not return_aux:
        return out
    return out, jax.tree.map(lambda a: a.reshape(call.batch), aux)


@functools.partial(jax.jit, static_argnames=("settings", "layout", "return_aux"))
def _sharded_loss(head: LinearHead, labels, class_weights, row_mask, vocab_mask, *,
                  settings: LinearCall, layout: MeshLayout, return_aux=False):  # fmt: skip
    """The loss after the checks, compiled once per mesh, settings and shapes, so that eager
    calls and their gradients run as one program each. ``settings`` is the checked call
    without its arrays."""
    num_local, padding = vocabulary_split(settings.num_classes, layout)
    pad = functools.partial(pad_classes, layout=layout, padding=padding)
    rows = P(layout.batch)
    inputs = {
        **head_inputs(head, layout, settings.tiles.layout, padding),
        "labels": (labels, rows),
        "class_weights": (
            None if class_weights is None else pad(class_weights, axis=0, spec=P()), P()
        ),
        "row_mask": (row_mask, rows),
        # global on every shard, like the class weights
        "vocab_mask": (
            None if vocab_mask is None else pad(vocab_mask, axis=0, spec=P(), value=False), P()
        ),
    }  # fmt: skip
    local = functools.partial(
        _local_loss, settings=settings, layout=layout, num_local=num_local, return_aux=return_aux
    )
    out_spec = rows if settings.options.reduction == "none" else P()
    if return_aux:
        out_spec = (out_spec, LossAux(*[rows] * len(LossAux._fields)))
    return run_sharded(local, layout, inputs, out_spec)


def _local_loss(local: dict, *, settings: LinearCall, layout: MeshLayout, num_local: int,
                return_aux: bool):  # fmt: skip
    """One device's loss: the fused rows over its vocabulary shard, reduced over the batch
    shards."""
    head = local_head(local)
    plan = fused.make_plan(
        settings, head.hidden.shape, num_local, axis_name=layout.classes,
        companions=return_aux,
    )  # fmt: skip
    loss, weight, *aux = fused.rows_and_weights(
        head, local["labels"], local.get("class_weights"), local.get("row_mask"),
        local.get("vocab_mask"), plan,
    )  # fmt: skip
    reduction = settings.options.reduction
    out = reduce_loss(loss, weight, reduction, layout.batch_names).astype(loss.dtype)
    return (out, aux[0]) if return_aux else out

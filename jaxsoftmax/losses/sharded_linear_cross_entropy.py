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
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsoftmax.checks import arrays
from jaxsoftmax.checks.options import reduce_loss
from jaxsoftmax.core.companion_terms import LossAux
from jaxsoftmax.losses import linear_cross_entropy as lce
from jaxsoftmax.losses.sharded_cross_entropy import (
    AxisName,
    _spec_entry,
    check_tokens_divide,
    mesh_axes,
    on_explicit_axes,
    pad_axis,
    run_on_mesh,
)


def sharded_linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    mesh: Mesh,
    class_axis_name: AxisName,
    batch_axis_name: AxisName | None = None,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    classifier_layout: str = "vd",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    accumulation_dtype=jnp.float32,
    return_aux: bool = False,
    vocab_mask: jax.typing.ArrayLike | None = None,
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
    call = lce._validated(
        hidden,
        classifier,
        labels,
        bias=bias,
        where=where,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        reduction=reduction,
        classifier_layout=classifier_layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        accumulation_dtype=accumulation_dtype,
        vocab_mask=vocab_mask,
    )
    check_tokens_divide(call.hidden.shape[0], mesh, batch_names, batch_axis_name,
                        "hidden's leading axes, flattened")  # fmt: skip
    explicit = on_explicit_axes(
        mesh, (hidden, classifier, labels, bias, where, class_weights, vocab_mask)
    )
    inputs = (call.hidden, call.classifier, call.labels, call.bias, call.class_weights)
    settings = call._replace(
        hidden=None, classifier=None, labels=None, bias=None, class_weights=None, row_mask=None,
        vocab_mask=None,
    )  # fmt: skip
    out = _sharded_loss(
        *inputs,
        call.row_mask,
        call.vocab_mask,
        settings=settings,
        mesh=mesh,
        class_names=class_names,
        batch_names=batch_names,
        explicit=explicit,
        return_aux=return_aux,
    )
    out, aux = out if return_aux else (out, None)
    if call.reduction == "none":
        out = out.reshape(call.batch)
    out = out.astype(call.hidden.dtype)
    if not return_aux:
        return out
    return out, jax.tree.map(lambda a: a.reshape(call.batch), aux)


@functools.partial(
    jax.jit,
    static_argnames=("settings", "mesh", "class_names", "batch_names", "explicit", "return_aux"),
)
def _sharded_loss(
    hidden, classifier, labels, bias, class_weights, row_mask, vocab_mask, *, settings, mesh,
    class_names, batch_names, explicit, return_aux=False,
):  # fmt: skip
    """The loss after validation, compiled once per mesh, settings and shapes, so that eager
    calls and their gradients run as one program each. ``settings`` is the checked call
    without its arrays."""
    call = settings._replace(
        hidden=hidden,
        classifier=classifier,
        labels=labels,
        bias=bias,
        class_weights=class_weights,
        row_mask=row_mask,
        vocab_mask=vocab_mask,
    )
    num_class_shards = math.prod(mesh.shape[n] for n in class_names)
    num_local = -(-call.num_classes // num_class_shards)
    padding = num_local * num_class_shards - call.num_classes
    vocab_axis = 0 if call.layout == "vd" else 1

    batch, classes = _spec_entry(batch_names), _spec_entry(class_names)
    rows = P(batch)
    pad = functools.partial(pad_axis, padding=padding, mesh=mesh if explicit else None)
    classifier_spec = P(classes, None) if call.layout == "vd" else P(None, classes)
    arrays = {
        "hidden": (call.hidden, P(batch, None)),
        "classifier": (
            pad(call.classifier, axis=vocab_axis, spec=classifier_spec),
            classifier_spec,
        ),
        "labels": (call.labels, rows),
    }
    if call.bias is not None:
        arrays["bias"] = (pad(call.bias, axis=0, spec=P(classes)), P(classes))
    if call.class_weights is not None:
        arrays["class_weights"] = (pad(call.class_weights, axis=0, spec=P()), P())
    if call.row_mask is not None:
        arrays["row_mask"] = (call.row_mask, rows)
    if call.vocab_mask is not None:  # global on every shard, like the class weights
        arrays["vocab_mask"] = (pad(call.vocab_mask, axis=0, spec=P(), value=False), P())
    names = list(arrays)
    specs = tuple(spec for _, spec in arrays.values())

    def local_loss(*local):
        got = dict(zip(names, local))
        plan = lce.make_plan(
            call, got["hidden"].shape[0], num_local, axis_name=classes, companions=return_aux
        )
        loss, weight, *aux = lce.rows_and_weights(
            got["hidden"],
            got["classifier"],
            got.get("bias"),
            got["labels"],
            got.get("class_weights"),
            got.get("row_mask"),
            plan,
            got.get("vocab_mask"),
        )
        out = reduce_loss(loss, weight, call.reduction, batch_names).astype(loss.dtype)
        return (out, aux[0]) if return_aux else out

    out_spec = rows if call.reduction == "none" else P()
    if return_aux:
        out_spec = (out_spec, LossAux(*[rows] * len(LossAux._fields)))
    placed = [x for x, _ in arrays.values()]
    return run_on_mesh(local_loss, mesh, placed, specs, out_spec, explicit=explicit)

"""``sharded_cross_entropy``: the vocabulary-parallel loss on global arrays and a mesh.

:func:`jaxsoftmax.cross_entropy` with ``axis_name=`` is the building block: called inside
``jax.shard_map`` with the class axis split over a mesh axis, each device reduces its own
classes and the rows' statistics (row maximum, sum of exponentials, target logit, and
the per-row sums that class weights and class masks need) are combined with
``pmax`` / ``psum`` over that axis. Only per-row values cross devices: ``O(N)`` numbers
per device per reduction, never the ``[N, V]`` logits. The backward of integer labels
without class weights needs no communication at all; with class weights or probability
targets it recomputes ``sum_c q_c`` with one more all-reduce of per-row values (and, for
class weights with label smoothing, of ``sum_c w_c``); see docs/scaling.md for the volumes.

:func:`sharded_cross_entropy` does the ``shard_map`` for the user: it takes the global
arrays, a ``jax.sharding.Mesh`` and the names of the mesh axes the classes (and,
optionally, the examples) are split over, picks the ``PartitionSpec`` of every argument,
and reduces across the batch shards so the result equals the single-device loss for
every reduction. A vocabulary that does not divide by the number of class shards is
padded to the next multiple with classes masked out of every sum (the padding is sliced
off the gradient); labels stay global class indices.

Under ``shard_map``'s default ``check_vma=True`` the per-row losses are checked to be the
same on every class shard (they are outputs of ``psum`` / ``pmax``), which is what lets
the batch-sharded output skip the class axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsoftmax.checks import arrays, checked_mode
from jaxsoftmax.checks.logits_call import LABEL_HINT, LogitsCall, LogitsSettings, check_logits_call
from jaxsoftmax.checks.mesh_axes import AxisName, check_tokens_divide, mesh_axes
from jaxsoftmax.checks.options import labels_on_masked_classes_out_of_range
from jaxsoftmax.core.companion_terms import LossAux
from jaxsoftmax.core.reduction import reduce_loss
from jaxsoftmax.losses.cross_entropy import cross_entropy, per_example_loss
from jaxsoftmax.losses.mesh_options import array_options, takes_options_of
from jaxsoftmax.tiles.mesh import (
    MeshLayout,
    on_explicit_axes,
    pad_classes,
    run_sharded,
    vocabulary_split,
)


@takes_options_of(cross_entropy, excluded=("axis", "axis_name"))
def sharded_cross_entropy(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    mesh: Mesh,
    class_axis_name: AxisName,
    batch_axis_name: AxisName | None = None,
    return_aux: bool = False,
    **options,
) -> jax.Array | tuple[jax.Array, LossAux]:
    r""":func:`~jaxsoftmax.cross_entropy` with the vocabulary split over a mesh axis.

    Runs :func:`~jaxsoftmax.cross_entropy` with ``axis_name=class_axis_name`` under
    ``jax.shard_map``: the logits ``[N, ..., V]`` are split by classes over
    ``class_axis_name`` and, when ``batch_axis_name`` is given, by examples (the first
    axis) over it. Each device holds ``[N / B, ..., V / S]`` logits and exchanges only
    per-row statistics, so the loss never gathers the logits; see docs/scaling.md.

    The value and the gradients are those of the single-device
    ``cross_entropy(logits, targets, ...)`` with the same options (the loss is the same
    formula; the sums over classes are split into per-shard sums plus a ``psum``).

    Args:
      logits: float ``[N, ..., V]``, classes on the last axis.
      targets: integer class indices ``[N, ...]`` (global indices in ``[0, V)``) or float
        probabilities ``[N, ..., V]``.
      mesh: the ``jax.sharding.Mesh`` (axes ``Auto`` or ``Explicit``).
      class_axis_name: the mesh axis (or tuple of axes) the classes are split over.
      batch_axis_name: the mesh axis (or tuple of axes) the first axis is split over, or
        None to keep every example on every device. ``N`` must divide by its size.
      where, ignore_index, label_smoothing, class_weights, z_loss, logit_softcap, reduction,
        checked, return_aux, vocab_mask: as in :func:`~jaxsoftmax.cross_entropy`
        (``vocab_mask`` is global, ``[V]``, split with the classes). ``class_weights`` is
        the global ``[V]`` vector (it is split with the classes); label smoothing spreads its
        mass over the global ``V`` classes. The companions need per-row statistics only
        (the entropy's sum and the first largest class cross devices as one number per row).

    Returns:
      The reduced loss (a scalar, replicated), or with ``reduction="none"`` the
      per-example losses ``[N, ...]``, split by examples over ``batch_axis_name``; with
      ``return_aux`` also the :class:`~jaxsoftmax.LossAux`, split like the examples.

    ``V`` need not divide by the number of class shards: the class axis is padded to the
    next multiple with masked classes. If your logits already live sharded on the mesh,
    padding them moves them between devices; keep ``V`` a multiple of the shard count (pad
    the classifier, as large models do) to avoid that.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jaxsoftmax import cross_entropy
      >>> from jaxsoftmax import sharded_cross_entropy
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
      >>> labels = jnp.array([0, 1])
      >>> loss = sharded_cross_entropy(logits, labels, mesh=mesh, class_axis_name="vocab")
      >>> print(f"{float(loss):.4f} {float(cross_entropy(logits, labels)):.4f}")
      0.3185 0.3185
    """
    return_aux = arrays.check_flag(return_aux, "return_aux")
    class_names, batch_names = mesh_axes(mesh, class_axis_name, batch_axis_name)
    # The single-device checks and messages, on the global arrays.
    call = check_logits_call(logits, targets, **options)
    if call.logits.ndim < 2 and batch_names:
        raise ValueError(
            f"batch_axis_name={batch_axis_name!r} splits the first axis of the "
            f"logits, but they have shape {tuple(call.logits.shape)} (no example axis)."
        )
    if batch_names:
        check_tokens_divide(call.logits.shape[0], mesh, batch_names, batch_axis_name,
                            "the logits' first axis")  # fmt: skip
    explicit = on_explicit_axes(mesh, (logits, targets, array_options(options)))
    layout = MeshLayout(mesh, class_names, batch_names, explicit)
    call = _global_labels_checked(call)
    return _sharded_loss(*call[:6], layout=layout, settings=call.settings, return_aux=return_aux)


def _global_labels_checked(call: LogitsCall) -> LogitsCall:
    """Checked mode on the global labels, outside ``shard_map``, against the real ``V``
    (staged as a checkify check when they are traced: needs ``jaxsoftmax.checked``), and
    labels on classes the ``vocab_mask`` leaves out made bad labels; the settings the
    devices get have no label check left."""
    settings, targets = call.settings, call.targets
    ignore_index = settings.options.ignore_index
    if settings.label_check is not None:
        checked_mode.check_labels(
            targets, call.num_classes, call.row_mask, name="targets", ignore_index=ignore_index,
            hint=LABEL_HINT, vocab_mask=call.vocab_mask,
        )  # fmt: skip
    if call.vocab_mask is not None and settings.integer:
        targets = labels_on_masked_classes_out_of_range(targets, call.vocab_mask, ignore_index)
    return call._replace(targets=targets, settings=dataclasses.replace(settings, label_check=None))


@functools.partial(jax.jit, static_argnames=("layout", "settings", "return_aux"))
def _sharded_loss(logits, targets, row_mask, class_mask, class_weights, vocab_mask, *,
                  layout: MeshLayout, settings: LogitsSettings, return_aux=False):  # fmt: skip
    """The loss after the checks, compiled once per mesh, settings and shapes, so that eager
    calls and their gradients run as one program each."""
    num_classes = logits.shape[-1]
    num_local, padding = vocabulary_split(num_classes, layout)
    rows_spec = P(layout.batch, *(None,) * (logits.ndim - 2)) if logits.ndim > 1 else P()
    logits_spec = P(*rows_spec, layout.classes)
    inputs = dict(
        logits=logits, targets=targets, row_mask=row_mask, class_mask=class_mask,
        class_weights=class_weights, vocab_mask=vocab_mask,
    )  # fmt: skip
    if padding:
        inputs = _padded_classes(inputs, settings, layout, padding, logits_spec)
    specs = dict(
        logits=logits_spec, targets=logits_spec if not settings.integer else rows_spec,
        row_mask=rows_spec, class_mask=logits_spec, class_weights=P(layout.classes),
        vocab_mask=P(layout.classes),
    )  # fmt: skip
    local = functools.partial(
        _local_loss, settings=settings, layout=layout, num_classes=num_classes,
        num_local=num_local, padding=padding, return_aux=return_aux,
    )  # fmt: skip
    out_spec = rows_spec if settings.options.reduction == "none" else P()
    if return_aux:
        out_spec = (out_spec, LossAux(*[rows_spec] * len(LossAux._fields)))
    named = {name: (inputs[name], specs[name]) for name in inputs}
    return run_sharded(local, layout, named, out_spec)


def _padded_classes(inputs: dict, settings, layout, padding: int, logits_spec) -> dict:
    """The class axis padded to a multiple of the class shards with classes masked out of
    every sum. A row mask becomes part of the class mask; masked rows get label 0 so a bad
    label there does not turn NaN (as on one device), and labels in ``[V, padded)`` stay
    out of range: they map to a sentinel."""
    got = dict(inputs)
    logits, targets, row_mask = got["logits"], got["targets"], got["row_mask"]
    num_classes, integer = logits.shape[-1], settings.integer
    if row_mask is not None:
        got["class_mask"] = jnp.broadcast_to(row_mask[..., None], logits.shape)
        if integer:
            targets = jnp.where(row_mask, targets, jnp.zeros((), targets.dtype))
        got["row_mask"] = None
    if integer:
        padded = num_classes + padding
        sentinel = -1 if settings.options.ignore_index != -1 else padded
        targets = jnp.where(targets >= num_classes, jnp.asarray(sentinel, targets.dtype), targets)
    pad = functools.partial(pad_classes, layout=layout, axis=-1, padding=padding)
    got["logits"] = pad(logits, spec=logits_spec)
    got["targets"] = targets if integer else pad(targets, spec=logits_spec)
    if got["class_mask"] is not None:
        got["class_mask"] = pad(got["class_mask"], value=False, spec=logits_spec)
    if got["class_weights"] is not None:
        got["class_weights"] = pad(got["class_weights"], spec=P(layout.classes))
    if got["vocab_mask"] is not None:
        got["vocab_mask"] = pad(got["vocab_mask"], value=False, spec=P(layout.classes))
    return got


def _local_loss(local: dict, *, settings, layout, num_classes, num_local, padding, return_aux):
    """One device's loss: :func:`~jaxsoftmax.cross_entropy`'s rows with the class axis split
    over ``layout``'s class axes, padded classes masked, reduced over the batch shards."""
    z = local["logits"]
    class_mask = local.get("class_mask")
    if padding:
        index = lax.broadcasted_iota(jnp.int32, (num_local,), 0)
        real = index + lax.axis_index(layout.class_names) * num_local < num_classes
        real = jnp.broadcast_to(real, z.shape)
        class_mask = real if class_mask is None else class_mask & real
    row_mask = None if class_mask is not None else local.get("row_mask")
    call = LogitsCall(
        z, local["targets"], row_mask, class_mask, local.get("class_weights"),
        local.get("vocab_mask"), settings,
    )  # fmt: skip
    loss, row_weight, *aux = per_example_loss(call, axis_name=layout.classes, companions=return_aux)
    reduction = settings.options.reduction
    out = reduce_loss(loss, row_weight, reduction, layout.batch_names).astype(z.dtype)
    return (out, aux[0]) if return_aux else out

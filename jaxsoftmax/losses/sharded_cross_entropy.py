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

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from jaxsoftmax.checks import arrays, checked_mode
from jaxsoftmax.checks.options import labels_on_masked_classes_out_of_range, reduce_loss
from jaxsoftmax.core.companion_terms import LossAux
from jaxsoftmax.losses.cross_entropy import LABEL_HINT, per_example_loss

AxisName = str | Sequence[str]


def _axis_names(name, argument: str, mesh: Mesh, *, allow_none: bool) -> tuple[str, ...]:
    """``name`` (a mesh axis name or a tuple of them) as a tuple, checked against ``mesh``."""
    if name is None:
        if allow_none:
            return ()
        raise TypeError(
            f"{argument} must name a mesh axis; got None. The mesh has axes "
            f"{tuple(mesh.axis_names)}."
        )
    names = tuple(name) if isinstance(name, (tuple, list)) else (name,)
    for n in names:
        if n not in mesh.axis_names:
            raise ValueError(
                f"{argument}={name!r} is not an axis of the mesh; the mesh has axes "
                f"{tuple(mesh.axis_names)}."
            )
    return names


def mesh_axes(mesh, class_axis_name, batch_axis_name) -> tuple[tuple, tuple]:
    """``(class_names, batch_names)`` of a sharded loss, checked: ``mesh`` is a ``Mesh``,
    the class axis names one or more of its axes, the batch axis none or others."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
    class_names = _axis_names(class_axis_name, "class_axis_name", mesh, allow_none=False)
    batch_names = _axis_names(batch_axis_name, "batch_axis_name", mesh, allow_none=True)
    if set(class_names) & set(batch_names):
        raise ValueError(
            f"class_axis_name={class_axis_name!r} and batch_axis_name="
            f"{batch_axis_name!r} must name different mesh axes."
        )
    return class_names, batch_names


def check_tokens_divide(num_tokens: int, mesh, batch_names, batch_axis_name, what: str) -> None:
    """The tokens (``what``: which arrays' leading axes, flattened) split evenly over the
    batch axes' shards, else a ValueError saying how to make them."""
    num_batch_shards = math.prod(mesh.shape[n] for n in batch_names)
    if num_tokens % num_batch_shards:
        raise ValueError(
            f"the {num_tokens} tokens ({what}) must divide by the {num_batch_shards} shards of "
            f"batch_axis_name={batch_axis_name!r}; pad the batch (and mask the padding with "
            "where= or ignore_index=) or choose another mesh."
        )


def _spec_entry(names: tuple[str, ...]):
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def _axis_names_in(spec) -> list:
    return [
        n
        for entry in spec
        if entry is not None
        for n in (entry if isinstance(entry, tuple) else (entry,))
    ]


def _explicitly_sharded(x) -> bool:
    """Whether ``x`` is typed as split over an ``Explicit`` mesh axis (sharding in types)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or not getattr(mesh, "axis_names", ()):
        return False
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return any(types.get(n) == AxisType.Explicit for n in _axis_names_in(sharding.spec))


def on_explicit_axes(mesh: Mesh, inputs) -> bool:
    """Whether the loss runs on ``mesh``'s ``Explicit`` axes: when an input is typed as split
    over one, or ``mesh`` is the mesh set with ``jax.set_mesh`` (whose axes then type every
    value of the computation)."""
    context = jax.sharding.get_abstract_mesh()
    if getattr(context, "axis_names", ()) and context != mesh.abstract_mesh:
        raise ValueError(
            f"mesh= is {mesh.abstract_mesh}, but jax.set_mesh holds another mesh, {context}; "
            "JAX runs a shard_map only on the mesh that is set. Pass that mesh as mesh=, or "
            "call the loss outside `with jax.set_mesh(...)`."
        )
    if any(_explicitly_sharded(x) for x in jax.tree.leaves(inputs)):
        return True
    return bool(context.axis_names) and AxisType.Explicit in tuple(mesh.axis_types)


def run_on_mesh(local_loss, mesh: Mesh, arrays, specs, out_spec, *, explicit: bool):
    """``jax.shard_map(local_loss)`` over ``mesh`` applied to ``arrays`` split by ``specs``.

    Inputs not laid out on the mesh (no ``Explicit`` axis in their type: plain arrays, or
    arrays on ``Auto`` axes) run on a copy of the mesh whose axes are all ``Auto``: the
    ``shard_map`` moves them, and the result and its cotangent carry no mesh in their types,
    so the loss and its gradient work eagerly and under ``jit``, with or without
    ``jax.set_mesh``, whatever the mesh's axis types (with ``Explicit`` types an eager
    gradient would need ``jax.set_mesh`` for its cotangent). Inputs the user laid out on
    ``Explicit`` axes keep them: the arguments are resharded to ``specs`` (a no-op when they
    already carry them) and the gradients come back sharded like the inputs.
    """
    if not explicit:
        auto = (AxisType.Auto,) * len(mesh.axis_names)
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
    else:
        arrays = [_place(a, mesh, spec) for a, spec in zip(arrays, specs)]
    return jax.shard_map(local_loss, mesh=mesh, in_specs=tuple(specs), out_specs=out_spec)(*arrays)


def _explicit_spec(mesh: Mesh, spec: P):
    """``spec`` restricted to the mesh's ``Explicit`` axes, or None if it names none."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))

    def explicit_only(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        names = tuple(n for n in names if n is not None and types[n] == AxisType.Explicit)
        return None if not names else names[0] if len(names) == 1 else names

    explicit = P(*(explicit_only(entry) for entry in spec))
    return explicit if _axis_names_in(explicit) else None


def _place(x, mesh: Mesh, spec: P):
    """Reshards ``x`` to ``spec`` along the mesh's ``Explicit`` axes; ``Auto`` axes need nothing.

    ``shard_map`` moves arguments on ``Auto`` axes itself but insists that arguments on
    ``Explicit`` axes already carry its ``in_specs``.
    """
    explicit = _explicit_spec(mesh, spec)
    if explicit is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, explicit))


def _padded(x, axis: int, padding: int, value):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padding)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames=("axis", "padding", "value", "sharding"))
def _padded_and_placed(x, axis: int, padding: int, value, sharding):
    # One compiled step: JAX 0.10 transposes an eager reshard into an array still split over
    # the padded axis, whose slice back to the unpadded size it cannot type.
    return jax.sharding.reshard(_padded(x, axis, padding, value), sharding)


def pad_axis(x, *, axis: int, padding: int, value=0, mesh=None, spec=None):
    """``x`` padded by ``padding`` entries of ``value`` along ``axis``.

    With ``mesh`` (a loss running on its ``Explicit`` axes), the padded array is also placed
    on ``spec``'s explicit axes, in the same compiled step so that its gradient (a slice of
    the padded cotangent) works eagerly too.
    """
    if not padding:
        return x
    explicit = None if mesh is None else _explicit_spec(mesh, spec)
    if explicit is None:
        return _padded(x, axis % x.ndim, padding, value)
    sharding = jax.sharding.NamedSharding(mesh, explicit)
    return _padded_and_placed(x, axis % x.ndim, padding, value, sharding)


def sharded_cross_entropy(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    mesh: Mesh,
    class_axis_name: AxisName,
    batch_axis_name: AxisName | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    checked: bool = False,
    return_aux: bool = False,
    vocab_mask: jax.typing.ArrayLike | None = None,
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
      >>> from jaxsoftmax.losses.sharded_cross_entropy import sharded_cross_entropy
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
      >>> labels = jnp.array([0, 1])
      >>> loss = sharded_cross_entropy(logits, labels, mesh=mesh, class_axis_name="vocab")
      >>> print(f"{float(loss):.4f} {float(cross_entropy(logits, labels)):.4f}")
      0.3185 0.3185
    """
    reduction = arrays.check_reduction(reduction)
    return_aux = arrays.check_flag(return_aux, "return_aux")
    class_names, batch_names = mesh_axes(mesh, class_axis_name, batch_axis_name)
    logits = arrays.check_logits(logits)
    targets = arrays.as_array(targets, "targets")
    integer = jnp.issubdtype(targets.dtype, jnp.integer)
    # Shapes, dtypes and option values are checked once, on the global shapes, with the
    # same messages as cross_entropy (nothing is computed; shardings are left out so the
    # check does not depend on how the arrays are laid out).
    jax.eval_shape(
        lambda z, t, w, cw, vm: per_example_loss(
            z,
            t,
            where=w,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            class_weights=cw,
            z_loss=z_loss,
            logit_softcap=logit_softcap,
            vocab_mask=vm,
        ),
        *jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
            (logits, targets, where, class_weights, vocab_mask),
        ),
    )
    if logits.ndim < 2 and batch_names:
        raise ValueError(
            f"batch_axis_name={batch_axis_name!r} splits the first axis of the "
            f"logits, but they have shape {tuple(logits.shape)} (no example axis)."
        )

    num_batch_shards = math.prod(mesh.shape[n] for n in batch_names)
    if batch_names and logits.shape[0] % num_batch_shards:
        raise ValueError(
            f"the first axis of the logits ({logits.shape[0]} examples) must divide by the "
            f"{num_batch_shards} shards of batch_axis_name={batch_axis_name!r}; pad the batch "
            "(and mask the padding with where= or ignore_index=) or choose another mesh."
        )
    num_classes = logits.shape[-1]

    row_mask = class_mask = None
    if where is not None:
        where = jnp.asarray(where)
        if where.shape == logits.shape:
            class_mask = where
        else:
            row_mask = where
    if checked and integer:
        # The check runs on the global labels, outside shard_map, against the real V: in
        # Python when they are known there, else as a checkify check (needs `checked`).
        check = dict(name="targets", ignore_index=ignore_index, hint=LABEL_HINT)
        check["vocab_mask"] = None if vocab_mask is None else jnp.asarray(vocab_mask)
        if checked_mode.check_labels_or_defer(targets, num_classes, row_mask, **check):
            checked_mode.check_labels(targets, num_classes, row_mask, **check)
    if vocab_mask is not None:
        vocab_mask = jnp.asarray(vocab_mask).reshape(num_classes)
        if integer:  # labels on masked classes: bad labels, found on the global labels
            targets = labels_on_masked_classes_out_of_range(targets, vocab_mask, ignore_index)

    explicit = on_explicit_axes(mesh, (logits, targets, where, class_weights, vocab_mask))
    return _sharded_loss(
        logits,
        targets,
        row_mask,
        class_mask,
        None if class_weights is None else jnp.asarray(class_weights),
        vocab_mask,
        mesh=mesh,
        class_names=class_names,
        batch_names=batch_names,
        explicit=explicit,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        reduction=reduction,
        return_aux=return_aux,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "mesh",
        "class_names",
        "batch_names",
        "explicit",
        "ignore_index",
        "label_smoothing",
        "z_loss",
        "logit_softcap",
        "reduction",
        "return_aux",
    ),
)
def _sharded_loss(
    logits,
    targets,
    row_mask,
    class_mask,
    class_weights,
    vocab_mask=None,
    *,
    mesh,
    class_names,
    batch_names,
    explicit,
    ignore_index,
    label_smoothing,
    z_loss,
    logit_softcap,
    reduction,
    return_aux=False,
):
    """The loss after validation, compiled once per mesh, options and shapes, so that eager
    calls and their gradients run as one program each."""
    integer = jnp.issubdtype(targets.dtype, jnp.integer)
    num_classes = logits.shape[-1]
    num_class_shards = math.prod(mesh.shape[n] for n in class_names)
    padded = -(-num_classes // num_class_shards) * num_class_shards
    padding = padded - num_classes
    num_local = padded // num_class_shards

    batch = _spec_entry(batch_names)
    classes = _spec_entry(class_names)
    middle = (None,) * (logits.ndim - 2)
    if logits.ndim == 1:
        logits_spec, rows_spec = P(classes), P()
    else:
        logits_spec, rows_spec = P(batch, *middle, classes), P(batch, *middle)
    targets_spec = rows_spec if integer else logits_spec

    explicit_mesh = mesh if explicit else None

    if padding:
        # Padded classes are masked out of every class sum, so a row mask becomes part of the
        # class mask; masked rows get label 0 so a bad label there does not turn NaN (as on
        # one device). Labels in [V, padded) must stay out of range: they map to a sentinel.
        if row_mask is not None:
            class_mask = jnp.broadcast_to(row_mask[..., None], logits.shape)
            if integer:
                targets = jnp.where(row_mask, targets, jnp.zeros((), targets.dtype))
            row_mask = None
        if integer:
            sentinel = -1 if ignore_index != -1 else padded
            targets = jnp.where(
                targets >= num_classes, jnp.asarray(sentinel, targets.dtype), targets
            )
        pad = functools.partial(pad_axis, axis=-1, padding=padding, mesh=explicit_mesh)
        logits = pad(logits, spec=logits_spec)
        if not integer:
            targets = pad(targets, spec=logits_spec)
        if class_mask is not None:
            class_mask = pad(class_mask, value=False, spec=logits_spec)
        if class_weights is not None:
            class_weights = pad(jnp.asarray(class_weights), spec=P(classes))
        if vocab_mask is not None:
            vocab_mask = pad(vocab_mask, value=False, spec=P(classes))

    arrays = [logits, targets]
    specs = [logits_spec, targets_spec]
    slots = {}
    for name, array, spec in (
        ("row_mask", row_mask, rows_spec),
        ("class_mask", class_mask, logits_spec),
        ("class_weights", class_weights, P(classes)),
        ("vocab_mask", vocab_mask, P(classes)),
    ):
        if array is not None:
            slots[name] = len(arrays)
            arrays.append(array)
            specs.append(spec)

    def local_loss(*local):
        z, t = local[0], local[1]
        got = {name: local[i] for name, i in slots.items()}
        mask = got.get("class_mask")
        if padding:
            index = lax.broadcasted_iota(jnp.int32, (num_local,), 0)
            real = index + lax.axis_index(class_names) * num_local < num_classes
            real = jnp.broadcast_to(real, z.shape)
            mask = real if mask is None else mask & real
        local_where = mask if mask is not None else got.get("row_mask")
        loss, row_weight, *aux = per_example_loss(
            z,
            t,
            where=local_where,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            class_weights=got.get("class_weights"),
            z_loss=z_loss,
            logit_softcap=logit_softcap,
            axis_name=_spec_entry(class_names),
            return_aux=return_aux,
            vocab_mask=got.get("vocab_mask"),
        )
        out = reduce_loss(loss, row_weight, reduction, batch_names).astype(z.dtype)
        return (out, aux[0]) if return_aux else out

    out_spec = rows_spec if reduction == "none" else P()
    if return_aux:
        out_spec = (out_spec, LossAux(*[rows_spec] * len(LossAux._fields)))
    return run_on_mesh(local_loss, mesh, arrays, specs, out_spec, explicit=explicit)

"""The mesh runner every sharded loss shares: ``shard_map`` on Auto or Explicit mesh axes.

A sharded loss lays its global arrays out on a mesh (the vocabulary over the class axes,
the tokens over the batch axes), pads the vocabulary to a multiple of the class shards,
and runs its per-device loss under ``jax.shard_map``: :func:`run_on_mesh` does the last
step, whatever the mesh's axis types, eagerly or under ``jit``, with or without
``jax.set_mesh``; :func:`pad_axis` the padding, placed on the mesh in the same compiled
step; :func:`on_explicit_axes` tells which of the two ways the inputs ask for.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from jaxsoftmax.checks.linear_head import LinearHead


def spec_entry(names: tuple[str, ...]):
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def axis_names_in(spec) -> list:
    return [
        n
        for entry in spec
        if entry is not None
        for n in (entry if isinstance(entry, tuple) else (entry,))
    ]


def explicitly_sharded(x) -> bool:
    """Whether ``x`` is typed as split over an ``Explicit`` mesh axis (sharding in types)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or not getattr(mesh, "axis_names", ()):
        return False
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return any(types.get(n) == AxisType.Explicit for n in axis_names_in(sharding.spec))


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
    if any(explicitly_sharded(x) for x in jax.tree.leaves(inputs)):
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
        arrays = [place(a, mesh, spec) for a, spec in zip(arrays, specs)]
    return jax.shard_map(local_loss, mesh=mesh, in_specs=tuple(specs), out_specs=out_spec)(*arrays)


def explicit_spec(mesh: Mesh, spec: P):
    """``spec`` restricted to the mesh's ``Explicit`` axes, or None if it names none."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))

    def explicit_only(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        names = tuple(n for n in names if n is not None and types[n] == AxisType.Explicit)
        return None if not names else names[0] if len(names) == 1 else names

    explicit = P(*(explicit_only(entry) for entry in spec))
    return explicit if axis_names_in(explicit) else None


def place(x, mesh: Mesh, spec: P):
    """Reshards ``x`` to ``spec`` along the mesh's ``Explicit`` axes; ``Auto`` axes need nothing.

    ``shard_map`` moves arguments on ``Auto`` axes itself but insists that arguments on
    ``Explicit`` axes already carry its ``in_specs``.
    """
    explicit = explicit_spec(mesh, spec)
    if explicit is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, explicit))


def padded(x, axis: int, padding: int, value):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padding)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames=("axis", "padding", "value", "sharding"))
def padded_and_placed(x, axis: int, padding: int, value, sharding):
    # One compiled step: JAX 0.10 transposes an eager reshard into an array still split over
    # the padded axis, whose slice back to the unpadded size it cannot type.
    return jax.sharding.reshard(padded(x, axis, padding, value), sharding)


def pad_axis(x, *, axis: int, padding: int, value=0, mesh=None, spec=None):
    """``x`` padded by ``padding`` entries of ``value`` along ``axis``.

    With ``mesh`` (a loss running on its ``Explicit`` axes), the padded array is also placed
    on ``spec``'s explicit axes, in the same compiled step so that its gradient (a slice of
    the padded cotangent) works eagerly too.
    """
    if not padding:
        return x
    explicit = None if mesh is None else explicit_spec(mesh, spec)
    if explicit is None:
        return padded(x, axis % x.ndim, padding, value)
    sharding = jax.sharding.NamedSharding(mesh, explicit)
    return padded_and_placed(x, axis % x.ndim, padding, value, sharding)


class MeshLayout(NamedTuple):
    """Where a sharded loss runs (static): the mesh, the checked class and batch axis names,
    and whether the inputs are laid out on the mesh's ``Explicit`` axes."""

    mesh: Mesh
    class_names: tuple
    batch_names: tuple
    explicit: bool

    @property
    def classes(self):
        """The class axes as one ``PartitionSpec`` entry."""
        return spec_entry(self.class_names)

    @property
    def batch(self):
        """The batch axes as one ``PartitionSpec`` entry (None: not split)."""
        return spec_entry(self.batch_names)


def vocabulary_split(num_classes: int, layout: MeshLayout) -> tuple[int, int]:
    """``(V_local, padding)``: each class shard's classes, and how many padded classes make
    ``V`` divide by the number of class shards."""
    shards = math.prod(layout.mesh.shape[n] for n in layout.class_names)
    local = -(-num_classes // shards)
    return local, local * shards - num_classes


def pad_classes(x, layout: MeshLayout, *, axis: int, padding: int, spec, value=0):
    """:func:`pad_axis` for a loss on ``layout``: placed on its Explicit axes if it has any."""
    mesh = layout.mesh if layout.explicit else None
    return pad_axis(x, axis=axis, padding=padding, value=value, mesh=mesh, spec=spec)


def head_inputs(head: LinearHead, layout: MeshLayout, classifier_layout: str, padding: int,
                prefix: str = "") -> dict:  # fmt: skip
    """A model's last layer as :func:`run_sharded` inputs, named ``prefix`` + ``hidden``,
    ``classifier``, ``bias``: the hidden states split by tokens over the batch axes, the
    classifier (``[V, d]`` by rows, ``[d, V]`` by columns) and the bias by vocabulary over the
    class axes, padded with ``padding`` zero classes."""
    pad = functools.partial(pad_classes, layout=layout, padding=padding)
    vd = classifier_layout == "vd"
    classifier_spec = P(layout.classes, None) if vd else P(None, layout.classes)
    classes = P(layout.classes)
    bias = None if head.bias is None else pad(head.bias, axis=0, spec=classes)
    return {
        f"{prefix}hidden": (head.hidden, P(layout.batch, None)),
        f"{prefix}classifier": (
            pad(head.classifier, axis=0 if vd else 1, spec=classifier_spec),
            classifier_spec,
        ),
        f"{prefix}bias": (bias, classes),
    }


def local_head(local: dict, prefix: str = "") -> LinearHead:
    """One device's shards of :func:`head_inputs`, as a :class:`LinearHead`."""
    return LinearHead(
        local[f"{prefix}hidden"], local[f"{prefix}classifier"], local.get(f"{prefix}bias")
    )


def run_sharded(local_loss, layout: MeshLayout, inputs: dict, out_spec):
    """``local_loss(local)`` on every device, ``local`` a dict of its shards of ``inputs``.

    ``inputs`` maps names to ``(global array or None, PartitionSpec)``; absent (None) arrays
    are left out of the ``shard_map`` and out of ``local``.
    """
    given = {name: entry for name, entry in inputs.items() if entry[0] is not None}
    names = list(given)

    def local(*shards):
        return local_loss(dict(zip(names, shards)))

    values = [array for array, _ in given.values()]
    specs = [spec for _, spec in given.values()]
    return run_on_mesh(local, layout.mesh, values, specs, out_spec, explicit=layout.explicit)

"""The mesh arguments of the sharded losses, checked: the mesh, its class and batch axes.

Every sharded loss (:func:`~jaxsoftmax.sharded_cross_entropy`,
:func:`~jaxsoftmax.sharded_linear_cross_entropy`,
:func:`~jaxsoftmax.sharded_linear_distillation_loss`) checks its ``mesh``,
``class_axis_name`` and ``batch_axis_name`` with :func:`mesh_axes`, and that its tokens
divide over the batch shards with :func:`check_tokens_divide`. The losses of logits that
take ``axis_name=`` (inside your own ``shard_map``) check it with :func:`check_mapped_axis`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

AxisName = str | Sequence[str]


def check_mapped_axis(axis_name) -> None:
    """``axis_name`` (a name or a tuple of names) is None or names axes mapped where the loss
    is called (inside ``jax.shard_map`` or ``jax.pmap``); outside, JAX's own error comes from
    the first collective, deep in the rule, so the loss says what to do first."""
    if axis_name is None:
        return
    for name in (axis_name,) if isinstance(axis_name, str) else tuple(axis_name):
        try:
            jax.lax.axis_size(name)
        except NameError:
            raise ValueError(
                f"axis_name={axis_name!r}: no mapped axis {name!r} here. axis_name= is for a "
                "loss called inside jax.shard_map (or jax.pmap) over a mesh with that axis, "
                "each device holding its slice of the classes; outside, call "
                "jaxsoftmax.sharded_cross_entropy(logits, labels, mesh=mesh, "
                "class_axis_name=...), which does the shard_map, or leave axis_name out."
            ) from None


def axis_names(name, argument: str, mesh: Mesh, *, allow_none: bool) -> tuple[str, ...]:
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
    class_names = axis_names(class_axis_name, "class_axis_name", mesh, allow_none=False)
    batch_names = axis_names(batch_axis_name, "batch_axis_name", mesh, allow_none=True)
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

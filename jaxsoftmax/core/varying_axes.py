"""How ``shard_map`` types values, for the rules that run inside it.

Under ``shard_map(check_vma=True)`` (its default) every value carries the mesh axes it varies
over: logits split by classes vary over the class axis, a ``psum`` over it does not. The
custom rules need that typing in three places: the cotangent a vocabulary shard receives,
the zeros a loop starts from, and the gradients of inputs that enter every shard alike.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
    """Mesh axes ``x`` is typed as varying over (``shard_map``'s ``check_vma``), else empty."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # jax 0.6 - 0.8


def whole_cotangent(g, logits, axis_name):
    """The per-row cotangent summed over the vocabulary shards' copies of the loss.

    Every shard holds the same per-row loss. Where ``shard_map`` types values
    (``check_vma=True``) the logits vary over ``axis_name``, the loss does not, and ``g``
    arrives whole on every shard. Without that typing (``pmap``,
    ``shard_map(check_vma=False)``) each shard's copy of the loss gets its own share of the
    cotangent (``g / S`` for a replicated output, or ``g`` on one shard and 0 on the others),
    and the true cotangent is their ``psum``: one number per row.
    """
    if axis_name is None:
        return g
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if set(names) <= varying_axes(logits):
        return g
    return lax.psum(g, axis_name)


def summed_like(cotangent, primal):
    """The cotangent summed over the mesh axes it varies over and ``primal`` does not.

    Under ``shard_map(check_vma=True)`` the hidden states enter the same on every vocabulary
    shard, while each shard's ``G W_shard`` is only its classes' part of their gradient: the
    true gradient is the ``psum`` over the shards (what JAX's own transpose of an invariant
    value used by varying ones does). Without vma typing (``check_vma=False``) nothing is
    varying here and ``shard_map``'s transpose adds the shards' parts itself.
    """
    if cotangent is None:
        return None
    missing = tuple(sorted(varying_axes(cotangent) - varying_axes(primal)))
    return lax.psum(cotangent, missing) if missing else cotangent


def typed_like_inputs(inputs):
    """A function that types a loop's initial carry like the loop's outputs.

    Under ``check_vma`` a value computed from arrays that vary over mesh axes varies over
    them too, so the zeros a loop starts from are cast to the union of its inputs' axes
    (nothing changes outside ``shard_map``).
    """
    axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(inputs)))

    def cast(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return lambda tree: jax.tree.map(cast, tree)

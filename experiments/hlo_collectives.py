"""Reading the collectives of a compiled program out of its HLO text."""

from __future__ import annotations

import math
import re

import numpy as np

_COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
    "collective-broadcast",
)
_OP = re.compile(
    r"=\s*(?P<result>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>" + "|".join(_COLLECTIVES) + r")(?:-start)?\("
)
_GROUPS = re.compile(r"replica_groups=\{(\{[0-9,]*\}(?:,\{[0-9,]*\})*)\}")
# Newer XLA (JAX 0.12) names a mesh and the axes reduced over instead of listing the groups:
# replica_groups=mesh['batch'=2,'vocab'=4] {'vocab'}; devices in the mesh's row-major order.
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<over>[^}]*)\}")
_MESH_AXIS = re.compile(r"'(?P<name>[^']+)'=(?P<size>[0-9]+)")
_SHAPE = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}


def collectives(hlo_text: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """``(op, [(dtype, shape), ...])`` for every collective in ``hlo_text``.

    The shapes are the op's result shapes: for an all-reduce they are its operands' shapes.
    Collectives whose every group is one device (``replica_groups={{0}}``, what a mesh of
    one device compiles to) move nothing and are left out.
    """
    return [(op, shapes) for op, shapes, _ in collectives_with_groups(hlo_text)]


def collectives_with_groups(hlo_text: str):
    """``(op, [(dtype, shape), ...], groups)`` for every collective that moves data, where
    ``groups`` is the op's device groups as a set of frozensets of device ids (None when
    the HLO does not list them explicitly)."""
    found = []
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        groups = _device_groups(line)
        if groups and all(len(g) <= 1 for g in groups):
            continue
        shapes = [
            (s["dtype"], tuple(int(d) for d in s["dims"].split(",") if d))
            for s in _SHAPE.finditer(match["result"])
        ]
        found.append((match["op"], shapes, groups or None))
    return found


def _device_groups(line: str):
    """The device groups of one collective's HLO line, in either printed form, or None."""
    listed = _GROUPS.search(line)
    if listed:
        return {
            frozenset(int(d) for d in g.strip("{}").split(",") if d) for g in listed[1].split("},{")
        }
    named = _MESH_GROUPS.search(line)
    if not named:
        return None
    axes = {m["name"]: int(m["size"]) for m in _MESH_AXIS.finditer(named["axes"])}
    over = re.findall(r"'([^']+)'", named["over"])
    ids = np.arange(math.prod(axes.values())).reshape(tuple(axes.values()))
    reduced = [list(axes).index(name) for name in over]
    kept = [i for i in range(len(axes)) if i not in reduced]
    grouped = ids.transpose(kept + reduced).reshape(-1, math.prod(ids.shape[i] for i in reduced))
    return {frozenset(int(d) for d in row) for row in grouped}


def elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def all_reduce_bytes(hlo_text: str) -> int:
    """Bytes of all operands of all all-reduces (each device's contribution)."""
    return sum(
        elements(shape) * BYTES[dtype]
        for op, shapes in collectives(hlo_text)
        if op == "all-reduce"
        for dtype, shape in shapes
    )

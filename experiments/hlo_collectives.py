"""Reading the collectives of a compiled program out of its HLO text."""

from __future__ import annotations

import math
import re

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
_SHAPE = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_BYTES = {
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
        groups = _GROUPS.search(line)
        if groups:
            groups = {
                frozenset(int(d) for d in g.strip("{}").split(",") if d)
                for g in groups[1].split("},{")
            }
            if all(len(g) <= 1 for g in groups):
                continue
        shapes = [
            (s["dtype"], tuple(int(d) for d in s["dims"].split(",") if d))
            for s in _SHAPE.finditer(match["result"])
        ]
        found.append((match["op"], shapes, groups or None))
    return found


def elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def all_reduce_bytes(hlo_text: str) -> int:
    """Bytes of all operands of all all-reduces (each device's contribution)."""
    return sum(
        elements(shape) * _BYTES[dtype]
        for op, shapes in collectives(hlo_text)
        if op == "all-reduce"
        for dtype, shape in shapes
    )

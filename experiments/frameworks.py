"""Runs the examples of docs/frameworks.md as written: how far apart the fused loss and the
logits path train the same model in flax.nnx, equinox and a plain optax step on a mesh.

Each example trains its model twice from the same start, with ``jaxsoftmax``'s fused loss and
with the logits materialised and optax's loss, and leaves ``fused_losses``,
``logits_losses``, ``fused_params`` and ``logits_params``; this prints, for each, the largest
differences between the two runs' losses and parameters, and exits with status 1 if either
exceeds the float32 tolerance the tests hold them to. Needs the frameworks
(``pip install -e ".[frameworks]"``). On 8 virtual CPU devices (the mesh example on a (2, 4)
mesh):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/frameworks.py
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import sys
from typing import Any, NamedTuple

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "frameworks.md"
# Float32 after a few optimizer steps: the runs sum in different orders, nothing more.
RTOL = ATOL = 1e-5


class Comparison(NamedTuple):
    """What an example left: the losses of each step and the trained parameters (pytrees of
    arrays, as the framework keeps them) of both runs, and what it printed."""

    fused_losses: jax.Array
    logits_losses: jax.Array
    fused_params: Any
    logits_params: Any
    printed: str


def examples(page: pathlib.Path = PAGE) -> dict[str, str]:
    """The page's Python blocks by their section: ``"flax.nnx"`` for ``## flax.nnx: ...``."""
    sections = re.split(r"^## ", page.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]
    found = {}
    for section in sections:
        blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
        if blocks:
            (found[section.split(":")[0].strip()],) = blocks  # one block a section
    return found


def run(code: str) -> Comparison:
    """Runs an example in a namespace of its own, as a reader pasting it would."""
    namespace, printed = {"__name__": "__main__"}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"<{PAGE.name}>", "exec"), namespace)
    fields = [namespace[name] for name in Comparison._fields[:-1]]
    return Comparison(*fields, printed.getvalue())


def largest_differences(result: Comparison) -> tuple[float, float]:
    """The largest ``|fused - logits|`` of the losses and of the parameters."""
    pairs = zip(jax.tree.leaves(result.fused_params), jax.tree.leaves(result.logits_params))
    params = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
    losses = np.asarray(result.fused_losses) - np.asarray(result.logits_losses)
    return float(np.max(np.abs(losses))), params


def agree(result: Comparison) -> bool:
    """The two runs' losses and parameters are equal within ``RTOL`` and ``ATOL``, and the
    two models have the same parameters (structure and shapes)."""
    if jax.tree.structure(result.fused_params) != jax.tree.structure(result.logits_params):
        return False
    pairs = [(result.fused_losses, result.logits_losses)]
    pairs += zip(jax.tree.leaves(result.fused_params), jax.tree.leaves(result.logits_params))
    return all(
        np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in pairs
    )


def main(argv: list[str] | None = None) -> int:
    parser = common.script_parser(__doc__)
    common.add_cache_flag(parser)
    common.parse_flags(parser, argv)
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    failed = []
    for name, code in examples().items():
        result = run(code)
        losses, _ = largest_differences(result)
        verdict = f"within {RTOL:g}" if agree(result) else f"NOT within {RTOL:g}"
        print(f"{name:9} {result.printed.strip()}")
        print(f"{'':9} losses apart by at most {losses:.1e}: {verdict}")
        failed += [] if agree(result) else [name]
    if failed:
        print(f"fused and logits runs differ beyond rtol = atol = {RTOL:g}: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

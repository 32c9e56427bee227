"""Where the time of loss plus gradient goes: each compiled kernel's time, from JAX's profiler.

XLA compiles ``jax.value_and_grad`` of a loss into a handful of fused kernels ("fusions"), each a
pass over its operands. This script runs the compiled programs of ``jaxsoftmax.cross_entropy``
and of optax's integer-label loss (both under ``jit(value_and_grad(...))``) under
``jax.profiler``, and prints every kernel of each program with its median time per call, its
output shape and the operation it came from. It is how ``docs/performance.md`` explains the
benchmark's ratios on the CPU: which passes each program makes over the ``[N, C]`` logits,
and what each pass costs.

Usage::

  python experiments/profile_fusions.py --shape 1024 1000
  python experiments/profile_fusions.py --shape 4096 32768 --calls 5 --dtype bfloat16

The profiler adds a little time to each kernel; compare kernels within a run, not against the
benchmark's wall-clock times.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import positive_int  # a helper module of the scripts

from jaxsoftmax import cross_entropy

LOSSES = {
    "jaxsoftmax": lambda z, y: cross_entropy(z, y),
    "optax": lambda z, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y)),
}

# One instruction of the compiled entry computation: `%name = shape op(...), ...`, and the
# operation of the traced program it came from, `op_name="jit(f)/.../exp"`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ")
_SOURCE = re.compile(r'op_name="([^"]*)"')


def entry_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """``{name: (shape, source operation)}`` for the compiled program's top-level instructions."""
    entry = hlo_text[hlo_text.index("\nENTRY ") :]
    entry = entry[entry.index("{\n") : entry.index("\n}")]
    found = {}
    for line in entry.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            source = _SOURCE.search(line)
            found[match[1]] = (match[2], source[1].split("/")[-1] if source else "")
    return found


def kernel_times(fn, args, names, calls: int) -> dict[str, float]:
    """Median seconds per call of each of ``names`` (top-level instructions of ``fn``'s compiled
    program, from :func:`entry_instructions`) that the profiler saw run; parameters and tuples
    take no time and are absent."""
    jax.block_until_ready(fn(*args))  # compile and warm up outside the trace
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        (trace_file,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(trace_file) as file:
            events = json.load(file)["traceEvents"]
    durations = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            durations[event["name"]].append(event["dur"] * 1e-6)  # the trace counts microseconds
    return {name: statistics.median(times) for name, times in durations.items()}


def profile(n: int, num_classes: int, dtype, calls: int) -> dict[str, list[dict]]:
    """Each loss's kernels, slowest first: ``name``, ``seconds``, ``shape``, ``source``."""
    keys = jax.random.split(jax.random.key(0), 2)
    logits = (2 * jax.random.normal(keys[0], (n, num_classes))).astype(dtype)
    labels = jax.random.randint(keys[1], (n,), 0, num_classes)
    report = {}
    for name, loss in LOSSES.items():
        fn = jax.jit(jax.value_and_grad(loss))
        instructions = entry_instructions(fn.lower(logits, labels).compile().as_text())
        times = kernel_times(fn, (logits, labels), instructions, calls)
        report[name] = sorted(
            (
                dict(
                    name=kernel,
                    seconds=seconds,
                    shape=instructions[kernel][0],
                    source=instructions[kernel][1],
                )
                for kernel, seconds in times.items()
            ),
            key=lambda row: -row["seconds"],
        )
    return report


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--shape",
        type=positive_int,
        nargs=2,
        default=(1024, 1000),
        metavar=("N", "C"),
        help="the logits' rows N and classes C",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="the logits' dtype"
    )
    parser.add_argument("--calls", type=positive_int, default=100, help="profiled calls per loss")
    args = parser.parse_args(argv)
    n, num_classes = args.shape
    report = profile(n, num_classes, jnp.dtype(args.dtype), args.calls)
    print(f"loss + gradient, logits [{n}, {num_classes}] {args.dtype}, {jax.devices()[0]}")
    for loss, rows in report.items():
        total = sum(row["seconds"] for row in rows)
        print(f"\n{loss}: {len(rows)} kernels, {total * 1e3:.3f} ms per call in kernels")
        for row in rows:
            print(
                f"  {row['seconds'] * 1e3:9.3f} ms  {row['name']:<32} {row['shape']:<24} "
                f"{row['source']}"
            )
    return report


if __name__ == "__main__":
    main()

"""Vocabulary-parallel cross-entropy on 1, 2, 4 and 8 *virtual* CPU devices.

Two losses: ``sharded_cross_entropy`` on given logits, and ``sharded_linear_cross_entropy``
(the fused classifier + loss, the classifier ``[V, d]`` split by vocabulary rows). Times
one training step's loss (``jax.value_and_grad`` of the mean loss, jitted, after a
warm-up, median of repeats, ``block_until_ready``) with the class axis split over
``d`` devices, reads each device's memory from the compiled program's
``memory_analysis()``, and the bytes each device puts into collectives from its HLO.

The devices are virtual (``--xla_force_host_platform_device_count``): they share this
machine's CPU cores, so the times show the cost of the pattern, not a real speed-up.
What carries over to a GPU or TPU mesh is the per-device memory (the logits and their
gradient shrink by ``d``) and the communication: per-row statistics, against the
``N x V`` logits that gathering would move. ``--model-rows`` / ``--model-classes``
compile (without running) the same step at a real model size to read those volumes.

    python experiments/benchmark_sharded.py                 # writes benchmarks/results/cpu/
    python experiments/benchmark_sharded.py --rows 16 --classes 64 --devices 1,2 --out /tmp/b
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_field_flags, number, positive_counts  # a helper module; no JAX


def _counting(minimum: int):
    """An argparse type: an integer >= ``minimum``; otherwise a usage error (exit 2)."""
    return number(int, lambda value: value >= minimum, f"an integer >= {minimum}")


# The flags: (name, type, help), their defaults in _DEFAULTS.
_FLAGS = (
    ("rows", _counting(1), "tokens N per step"),
    ("classes", _counting(1), "vocabulary size V"),
    ("devices", positive_counts("device counts", "1,2,4"), "comma-separated device counts"),
    ("repeats", _counting(1), "timed runs (median reported)"),
    ("model_rows", _counting(0), "N for the compile-only communication check (0: skip)"),
    ("model_classes", _counting(1), "V for the compile-only communication check"),
    ("width", _counting(1), "hidden size d of the linear loss's timed runs"),
    ("model_width", _counting(1), "d for the linear loss's compile-only communication check"),
    ("out", str, "directory for sharded.json and sharded.md"),
)
_DEFAULTS = dict(
    rows=1024,
    classes=32768,
    devices="1,2,4,8",
    repeats=7,
    model_rows=8192,
    model_classes=256000,
    width=128,
    model_width=2304,
    out=os.path.join("benchmarks", "results", "cpu"),
)
_parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
)
add_field_flags(_parser, _DEFAULTS, _FLAGS)

if __name__ == "__main__":
    _ARGS = _parser.parse_args()
    _MAX_DEVICES = max(_ARGS.devices)
    # JAX reads the device count once, when it starts: set it before importing jax.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_MAX_DEVICES}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime
import functools
import json
import pathlib
import platform
import statistics
import time

import harness
import hlo_collectives
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsoftmax import (
    cross_entropy,
    linear_cross_entropy,
    sharded_cross_entropy,
    sharded_linear_cross_entropy,
    training,
)


def step_fn(devices: int):
    """``value_and_grad`` of the mean loss with the vocabulary over ``devices`` devices."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("vocab",))
    loss = functools.partial(sharded_cross_entropy, mesh=mesh, class_axis_name="vocab")
    placement = (NamedSharding(mesh, P(None, "vocab")), NamedSharding(mesh, P()))
    return jax.jit(jax.value_and_grad(loss)), placement


def inputs(rows: int, classes: int):
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    logits = jax.random.normal(keys[0], (rows, classes), jnp.float32)
    labels = jax.random.randint(keys[1], (rows,), 0, classes)
    return logits, labels


def measure(devices: int, rows: int, classes: int, repeats: int) -> dict:
    step, (logits_at, labels_at) = step_fn(devices)
    logits, labels = inputs(rows, classes)
    logits, labels = jax.device_put(logits, logits_at), jax.device_put(labels, labels_at)
    compiled = step.lower(logits, labels).compile()
    reference = cross_entropy(jax.device_get(logits), jax.device_get(labels))
    return {
        "devices": devices,
        **timed(compiled, (logits, labels), repeats),
        "loss_single_device": float(reference),
        "per_device_bytes": _memory(compiled),
        **collectives_of(compiled.as_text()),
        "gather_logits_bytes_per_device": rows * classes * 4 * (devices - 1) // devices,
    }


def timed(compiled, arguments: tuple, repeats: int) -> dict:
    """The median and every time of ``repeats`` calls of ``compiled`` after a warm-up call,
    and the loss it returned."""
    value, grads = compiled(*arguments)  # warm-up
    jax.block_until_ready((value, grads))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*arguments))
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "seconds_all": times, "loss": float(value)}


def collectives_of(text: str) -> dict:
    """The collectives of a compiled program's text and the bytes its all-reduces carry."""
    return {
        "collectives": [
            [op, [f"{d}{list(s)}" for d, s in shapes]]
            for op, shapes in hlo_collectives.collectives(text)
        ],
        "all_reduce_bytes_per_device": hlo_collectives.all_reduce_bytes(text),
    }


def model_size_communication(devices: int, rows: int, classes: int) -> dict:
    """Compiles (does not run) the step at a real model size; reads its collectives."""
    step, (logits_at, labels_at) = step_fn(devices)
    logits = jax.ShapeDtypeStruct((rows, classes), jnp.bfloat16, sharding=logits_at)
    labels = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=labels_at)
    text = step.lower(logits, labels).compile().as_text()
    measured = hlo_collectives.all_reduce_bytes(text)
    # Predicted: max, sum of exponentials and label logit, one f32 per row each.
    predicted = 3 * rows * 4
    gathered = rows * classes * 2 * (devices - 1) // devices  # bf16 logits, all-gather
    return {
        "devices": devices,
        "rows": rows,
        "classes": classes,
        "logits_dtype": "bfloat16",
        "all_reduce_bytes_per_device": measured,
        "predicted_bytes_per_device": predicted,
        "gather_logits_bytes_per_device": gathered,
        "collectives": collectives_of(text)["collectives"],
    }


def linear_step_fn(devices: int):
    """``value_and_grad`` (hidden, classifier) of the mean fused loss, vocabulary split."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("vocab",))
    loss = functools.partial(sharded_linear_cross_entropy, mesh=mesh, class_axis_name="vocab")
    placement = (
        NamedSharding(mesh, P()),
        NamedSharding(mesh, P("vocab", None)),
        NamedSharding(mesh, P()),
    )
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), placement


def _memory(compiled) -> dict:
    memory = compiled.memory_analysis()
    return {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "total": (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        ),
    }


def _all_reduce_bytes_by_size(text: str, rows: int) -> dict:
    """All-reduce operand bytes split into per-row statistics (at most one value per row)
    and larger operands (the hidden states' gradient sum)."""
    split = {"per_row": 0, "larger": 0}
    for op, shapes in hlo_collectives.collectives(text):
        for dtype, shape in shapes:
            if op == "all-reduce":
                size = hlo_collectives.elements(shape)
                split["per_row" if size <= rows else "larger"] += (
                    size * hlo_collectives.BYTES[dtype]
                )
    return split


def measure_linear(devices: int, rows: int, classes: int, width: int, repeats: int) -> dict:
    step, (hidden_at, classifier_at, labels_at) = linear_step_fn(devices)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    hidden = jax.random.normal(keys[0], (rows, width), jnp.float32)
    classifier = jax.random.normal(keys[1], (classes, width), jnp.float32) / np.sqrt(width)
    labels = jax.random.randint(keys[2], (rows,), 0, classes)
    reference = linear_cross_entropy(hidden, classifier, labels)
    hidden, classifier, labels = (
        jax.device_put(x, at)
        for x, at in ((hidden, hidden_at), (classifier, classifier_at), (labels, labels_at))
    )
    compiled = step.lower(hidden, classifier, labels).compile()
    text = compiled.as_text()
    return {
        "devices": devices,
        **timed(compiled, (hidden, classifier, labels), repeats),
        "loss_single_device": float(reference),
        "per_device_bytes": _memory(compiled),
        **collectives_of(text),
        "all_reduce_bytes_split": _all_reduce_bytes_by_size(text, rows),
        "gather_logits_bytes_per_device": rows * classes * 4 * (devices - 1) // devices,
    }


def linear_model_size_communication(devices: int, rows: int, classes: int, width: int) -> dict:
    """Compiles (does not run) the fused step at a real model size, bf16; reads collectives."""
    step, (hidden_at, classifier_at, labels_at) = linear_step_fn(devices)
    text = (
        step.lower(
            jax.ShapeDtypeStruct((rows, width), jnp.bfloat16, sharding=hidden_at),
            jax.ShapeDtypeStruct((classes, width), jnp.bfloat16, sharding=classifier_at),
            jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=labels_at),
        )
        .compile()
        .as_text()
    )
    split = _all_reduce_bytes_by_size(text, rows)
    return {
        "devices": devices,
        "rows": rows,
        "classes": classes,
        "width": width,
        "dtype": "bfloat16",
        "all_reduce_bytes_per_device": hlo_collectives.all_reduce_bytes(text),
        "statistics_bytes_per_device": split["per_row"],
        "predicted_statistics_bytes": 3 * rows * 4,
        "hidden_gradient_bytes_per_device": split["larger"],
        "predicted_hidden_gradient_bytes": rows * width * 2,
        "gather_logits_bytes_per_device": rows * classes * 2 * (devices - 1) // devices,
        "gather_classifier_bytes_per_device": classes * width * 2 * (devices - 1) // devices,
        "collectives": [
            [op, [f"{d}{list(s)}" for d, s in shapes]]
            for op, shapes in hlo_collectives.collectives(text)
        ],
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _per_device_table(runs: list[dict], columns_after: list[str], cells) -> list[str]:
    """The Markdown table of ``runs``: devices, time, memory per device and its temporaries,
    the ``columns_after`` of ``cells(run)``, the loss."""

    def row(r: dict) -> list[str]:
        memory = r["per_device_bytes"]
        fixed = [str(r["devices"]), f"{1e3 * r['seconds']:.1f}", _mib(memory["total"])]
        return [*fixed, _mib(memory["temporaries"]), *cells(r), f"{r['loss']:.6f}"]

    columns = ["devices", "time (ms)", "memory per device (MiB)", "of which temporaries (MiB)"]
    header = [*columns, *columns_after, "loss"]
    return harness.markdown_table(header, [row(r) for r in runs], rule=" ---: ")


def _single_device_loss(runs: list[dict]) -> list[str]:
    return ["", f"Single-device loss for comparison: {runs[0]['loss_single_device']:.6f}."]


def _at_model_size(model: dict, heading: str, findings: list[str]) -> list[str]:
    """The section on the compile-only check at model size: ``heading`` and the device
    count, then a list of the ``findings`` and the collectives."""
    items = [*findings, f"collectives: {model['collectives']}"]
    return ["", f"{heading}, {model['devices']} devices", "", *(f"- {item}" for item in items)]


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        "# Vocabulary-parallel cross-entropy on virtual CPU devices",
        "",
        f"`value_and_grad` of the mean loss, N = {c['rows']} rows, V = {c['classes']} classes, "
        f"float32, class axis split over d devices; median of {c['repeats']} runs after a "
        "warm-up.",
        "",
        "**These are virtual devices on one CPU** "
        f"({result['machine']['cpu_count']} cores, `{result['machine']['platform']}`, load "
        f"average {result['machine']['load_average_1min']:.1f} when it ran): they "
        "share the cores, so the time shows the cost of the communication pattern, not a "
        "speed-up. Memory per device and bytes communicated are what carry over to a real mesh.",
        "",
        *_per_device_table(
            result["runs"],
            ["all-reduce bytes per device", "gathering the logits instead (MiB)"],
            lambda r: [
                str(r["all_reduce_bytes_per_device"]),
                _mib(r["gather_logits_bytes_per_device"]),
            ],
        ),
    ]
    lines += _single_device_loss(result["runs"])
    model = result.get("model_size")
    if model:
        lines += _at_model_size(
            model,
            f"## At model size (compiled, not run): N = {model['rows']}, V = {model['classes']}, "
            "bf16 logits",
            [
                f"all-reduce operands per device, read from the compiled HLO: "
                f"{model['all_reduce_bytes_per_device']} bytes "
                f"({model['predicted_bytes_per_device']} predicted: 3 float32 per row)",
                f"all-gather of the logits instead: {model['gather_logits_bytes_per_device']} "
                f"bytes ({model['gather_logits_bytes_per_device'] / 2**30:.2f} GiB) per device",
            ],
        )
    linear = result.get("linear_runs")
    if linear:
        lines += [
            "",
            "## The fused linear loss (`sharded_linear_cross_entropy`)",
            "",
            f"`value_and_grad` (hidden, classifier) of the mean loss, N = {c['rows']} tokens, "
            f"d = {c['width']}, V = {c['classes']} classes, float32, the classifier `[V, d]` split "
            "by vocabulary rows over d **virtual** devices (same caveat: shared cores). Memory "
            "per device is the compiled program's arguments + outputs + temporaries.",
            "",
            *_per_device_table(
                linear,
                ["all-reduce bytes per device: statistics", ": hidden-state gradient"],
                lambda r: [
                    str(r["all_reduce_bytes_split"][part]) for part in ("per_row", "larger")
                ],
            ),
        ]
        lines += _single_device_loss(linear)
    model = result.get("linear_model_size")
    if model:
        lines += _at_model_size(
            model,
            f"### At model size (compiled, not run): N = {model['rows']}, d = {model['width']}, "
            f"V = {model['classes']}, bf16",
            [
                f"per-row statistics: {model['statistics_bytes_per_device']} bytes per device "
                f"({model['predicted_statistics_bytes']} predicted: 3 float32 per row)",
                f"the hidden states' gradient sum: {model['hidden_gradient_bytes_per_device']} "
                f"bytes ({model['predicted_hidden_gradient_bytes']} predicted: N x d bf16; the "
                "program asks for a bf16 psum, which XLA's CPU compiler widens to float32, twice "
                "that)",
                f"gathering the logits instead: {model['gather_logits_bytes_per_device']} bytes "
                f"({model['gather_logits_bytes_per_device'] / 2**30:.2f} GiB); gathering the "
                f"classifier: {model['gather_classifier_bytes_per_device']} bytes",
            ],
        )
    lines += [
        "",
        "Reproduce: `python experiments/benchmark_sharded.py` "
        f"(`{' '.join(sys.argv[1:]) or 'default flags'}`).",
    ]
    return "\n".join(lines) + "\n"


def main(args) -> dict:
    counts = list(args.devices)
    runs = [measure(d, args.rows, args.classes, args.repeats) for d in counts]
    result = {
        "what": "vocabulary-parallel cross_entropy, value_and_grad, virtual CPU devices",
        "virtual_devices": True,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "jax": jax.__version__,
        },
        "config": {
            "rows": args.rows,
            "classes": args.classes,
            "repeats": args.repeats,
            "dtype": "float32",
        },
        "runs": runs,
    }
    result["config"]["width"] = args.width
    result["linear_runs"] = [
        measure_linear(d, args.rows, args.classes, args.width, args.repeats) for d in counts
    ]
    if args.model_rows:
        result["model_size"] = model_size_communication(
            max(counts), args.model_rows, args.model_classes
        )
        result["linear_model_size"] = linear_model_size_communication(
            max(counts), args.model_rows, args.model_classes, args.model_width
        )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    training.write_atomically(str(out / "sharded.json"), json.dumps(result, indent=2) + "\n")
    training.write_atomically(str(out / "sharded.md"), markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(_ARGS)

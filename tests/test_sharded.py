"""The vocabulary-parallel losses on one device, and their benchmark script.

The checks on 8 virtual CPU devices (``tests/multidevice/check_sharded.py``,
``check_sharded_linear.py`` and ``check_mesh_types.py``) run in the child pytest of
``tests/test_eight_devices.py``.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re
import subprocess
import sys

import child_process
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsoftmax import (
    cross_entropy,
    linear_cross_entropy,
    sharded_cross_entropy,
    sharded_linear_cross_entropy,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(command, *, devices, timeout, environment=()):
    env = child_process.environment(devices, **dict(environment))
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result


def test_benchmark_runs_on_a_tiny_config(tmp_path):
    result = _run(
        [
            sys.executable,
            "experiments/benchmark_sharded.py",
            "--rows",
            "16",
            "--classes",
            "64",
            "--devices",
            "1,2",
            "--repeats",
            "1",
            "--model-rows",
            "0",
            "--out",
            str(tmp_path),
        ],
        devices=2,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    data = json.loads((tmp_path / "sharded.json").read_text())
    runs = data["runs"]
    assert [r["devices"] for r in runs] == [1, 2]
    assert all(r["seconds"] > 0 for r in runs)
    # One device needs no collective; two exchange per-row statistics only.
    assert runs[0]["all_reduce_bytes_per_device"] == 0
    assert 0 < runs[1]["all_reduce_bytes_per_device"] < 16 * 64 * 4
    linear = data["linear_runs"]
    assert [r["devices"] for r in linear] == [1, 2]
    assert linear[0]["all_reduce_bytes_per_device"] == 0
    # Two devices: the statistics, and the hidden states' gradient [16, d] summed once.
    assert 0 < linear[1]["all_reduce_bytes_split"]["per_row"] < 16 * 64 * 4
    assert linear[1]["all_reduce_bytes_split"]["larger"] == 16 * 128 * 4
    np.testing.assert_allclose(linear[1]["loss"], linear[1]["loss_single_device"], rtol=1e-5)
    assert (tmp_path / "sharded.md").read_text().startswith("#")


def test_one_device_mesh_equals_cross_entropy():
    """On this process's single device the wrapper is the plain loss (shard count 1)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((6, 10)), jnp.float32)
    labels = jnp.array([0, 9, 3, 3, -100, 5])
    options = dict(label_smoothing=0.1, ignore_index=-100, z_loss=1e-3)
    sharded = functools.partial(
        sharded_cross_entropy, mesh=mesh, class_axis_name="vocab", **options
    )
    plain = functools.partial(cross_entropy, **options)

    def value_and_grad(loss, reduction):
        total = lambda z: jnp.sum(loss(z, labels, reduction=reduction))
        return jax.value_and_grad(total)(logits) + (loss(logits, labels, reduction=reduction),)

    # Every reduction, wrapped and plain: one compiled program.
    results = jax.jit(
        lambda: {
            r: [value_and_grad(loss, r) for loss in (sharded, plain)]
            for r in ("mean", "sum", "none")
        }
    )()
    for reduction, (got, want) in results.items():
        for name, a, b in zip(("sum", "gradient", "value"), got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{reduction} {name}")


def test_mesh_errors_are_clear():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    logits = jnp.zeros((2, 3))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sharded_cross_entropy(logits, jnp.array([0, 1]), mesh=None, class_axis_name="vocab")
    with pytest.raises(TypeError, match="class_axis_name must name a mesh axis"):
        sharded_cross_entropy(logits, jnp.array([0, 1]), mesh=mesh, class_axis_name=None)
    with pytest.raises(ValueError, match="targets must have the logits' shape without"):
        sharded_cross_entropy(logits, jnp.array([0, 1, 2]), mesh=mesh, class_axis_name="vocab")


def test_one_device_mesh_equals_linear_cross_entropy():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    classifier = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)
    labels = jnp.array([0, 9, 3, 3, -100, 5])
    options = dict(label_smoothing=0.1, ignore_index=-100, z_loss=1e-3, vocab_chunk=3)
    got = jax.jit(
        jax.value_and_grad(
            lambda h, w: sharded_linear_cross_entropy(
                h, w, labels, mesh=mesh, class_axis_name="vocab", **options
            ),
            argnums=(0, 1),
        )
    )
    want = jax.jit(
        jax.value_and_grad(
            lambda h, w: linear_cross_entropy(h, w, labels, **options), argnums=(0, 1)
        )
    )
    for a, b in zip(
        jax.tree.leaves(got(hidden, classifier)), jax.tree.leaves(want(hidden, classifier))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sharded_linear_cross_entropy(hidden, classifier, labels, mesh=None, class_axis_name="vocab")


def _operand_bytes(operand):
    """``"f32[8192, 1]"`` -> 32768: the bytes of one all-reduce operand as the JSON lists it."""
    dtype, dims = re.fullmatch(r"(\w+)\[([\d, ]*)\]", operand).groups()
    elements = math.prod(int(d) for d in dims.split(",") if d.strip())
    return elements * {"f32": 4, "bf16": 2, "f16": 2, "f64": 8}[dtype]


def test_committed_model_size_communication_is_as_predicted():
    """benchmarks/results/cpu/sharded.json, compiled for N = 8192, V = 256000 on 8 devices:
    the all-reduce bytes read from the HLO equal 3 float32 per row (docs/scaling.md)."""
    results = json.loads((ROOT / "benchmarks" / "results" / "cpu" / "sharded.json").read_text())
    model = results["model_size"]
    rows = model["rows"]
    predicted = 3 * rows * 4  # row maximum, sum of exponentials, label logit, float32
    operands = [o for op, shapes in model["collectives"] for o in shapes if op == "all-reduce"]
    assert [op for op, _ in model["collectives"]] == ["all-reduce"] * len(model["collectives"])
    assert sorted(operands) == [f"f32[{rows}, 1]"] * 3
    assert sum(map(_operand_bytes, operands)) == model["all_reduce_bytes_per_device"]
    assert model["all_reduce_bytes_per_device"] == model["predicted_bytes_per_device"]
    assert model["predicted_bytes_per_device"] == predicted == 98_304

    linear = results["linear_model_size"]
    rows, width = linear["rows"], linear["width"]
    operands = [o for op, shapes in linear["collectives"] for o in shapes if op == "all-reduce"]
    assert [op for op, _ in linear["collectives"]] == ["all-reduce"] * len(linear["collectives"])
    statistics = [o for o in operands if o == f"f32[{rows}]"]
    assert len(statistics) == 3 and sorted(operands) == sorted(
        [*statistics, f"f32[{rows}, {width}]"]
    )
    assert sum(map(_operand_bytes, statistics)) == linear["statistics_bytes_per_device"]
    assert linear["statistics_bytes_per_device"] == linear["predicted_statistics_bytes"]
    assert linear["predicted_statistics_bytes"] == 3 * rows * 4
    # dh: a bf16 psum in the program, widened to float32 by XLA's CPU compiler
    assert linear["predicted_hidden_gradient_bytes"] == rows * width * 2
    assert linear["hidden_gradient_bytes_per_device"] == _operand_bytes(f"f32[{rows}, {width}]")
    assert linear["all_reduce_bytes_per_device"] == sum(map(_operand_bytes, operands))

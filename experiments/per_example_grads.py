"""Per-example gradients with ``vmap(grad)``, checked against a Python loop and timed against it.

``mlp.per_example_grads`` computes ``d loss(params, x[n], y[n]) / d params`` for every ``n`` in
one vectorised call. This script checks it against ``jax.grad`` called on one example at a time,
then times both (compilation excluded: each is run once before timing, and every timing waits
with ``block_until_ready``).

    python experiments/per_example_grads.py --dataset digits --batch-size 256
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
from common import non_negative_float, positive_int

from jaxsoftmax import data, mlp


def loop_of_grads(single_example_grad, params, x, labels):
    """The reference: one (jitted) ``jax.grad`` call per example, stacked."""
    grads = [single_example_grad(params, x[n], labels[n]) for n in range(len(x))]
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *grads)


def best_seconds(function, repeats):
    jax.block_until_ready(function())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return min(times)


def compiled_gradients(options: dict):
    """The jitted per-example gradients of :func:`jaxsoftmax.mlp.per_example_grads` and the
    jitted gradient of one example's loss, with the loss's ``options``."""
    vectorised = jax.jit(lambda p, xs, ys: mlp.per_example_grads(p, xs, ys, **options))
    single_example_grad = jax.jit(jax.grad(lambda p, xi, yi: mlp.loss(p, xi, yi, **options)))
    return vectorised, single_example_grad


def agreement(with_vmap, with_loop, params, x, labels, options: dict):
    """``(largest, mean_gap, norms)``: the largest difference between the two ways' gradients,
    the largest between their mean and the batch gradient, and each example's gradient norm."""
    leaves = jax.tree_util.tree_leaves
    largest = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves(with_vmap), leaves(with_loop))
    )
    batch_gradient = jax.grad(lambda p: mlp.loss(p, x, labels, **options))(params)
    mean_gap = max(
        float(jnp.max(jnp.abs(jnp.mean(a, axis=0) - b)))
        for a, b in zip(leaves(with_vmap), leaves(batch_gradient))
    )
    norms = np.sqrt(
        sum(np.sum(np.asarray(g).reshape(len(x), -1) ** 2, axis=1) for g in leaves(with_vmap))
    )
    return largest, mean_gap, norms


# The flags: (name, type or choices, help), their defaults in DEFAULTS.
FLAGS = (
    ("dataset", data.DATASETS, "the data"),
    ("batch_size", positive_int, "examples to differentiate"),
    ("hidden", positive_int, "hidden width"),
    ("activation", tuple(sorted(mlp.ACTIVATIONS)), "activation of the hidden layer"),
    ("l2", non_negative_float, "L2 weight penalty, >= 0"),
    ("repeats", positive_int, "timed runs of each method (best kept)"),
    ("seed", int, "seed of the data and parameters"),
)
DEFAULTS = dict(
    dataset="digits", batch_size=128, hidden=100, activation="relu", l2=1e-3, repeats=5, seed=0
)


def main(argv=None) -> int:
    parser = common.script_parser(__doc__)
    common.add_field_flags(parser, DEFAULTS, FLAGS)
    common.add_cache_flag(parser)
    arguments = common.parse_flags(parser, argv)

    dataset = data.load(arguments.dataset, seed=arguments.seed, standardized=True)
    if arguments.batch_size > len(dataset.y_train):
        parser.error(
            f"--batch-size {arguments.batch_size} exceeds the {len(dataset.y_train)} "
            f"training examples of {arguments.dataset}"
        )
    x = jnp.asarray(dataset.x_train[: arguments.batch_size])
    labels = jnp.asarray(dataset.y_train[: arguments.batch_size])
    sizes = [dataset.num_features, arguments.hidden, dataset.num_classes]
    params = mlp.init(jax.random.key(arguments.seed), sizes, scheme="he")
    options = {"l2": arguments.l2, "activation": arguments.activation}

    vectorised, single_example_grad = compiled_gradients(options)
    with_vmap = vectorised(params, x, labels)
    with_loop = loop_of_grads(single_example_grad, params, x, labels)
    largest, mean_gap, norms = agreement(with_vmap, with_loop, params, x, labels, options)

    print(
        f"device: {jax.devices()[0].platform}, dataset: {arguments.dataset}, "
        f"{len(x)} examples, network {' -> '.join(map(str, sizes))}"
    )
    print(f"max |vmap - loop|               = {largest:.2e}")
    print(f"max |mean_n g_n - batch grad|   = {mean_gap:.2e}")
    print(
        f"per-example gradient norm: min {norms.min():.3g}, median {np.median(norms):.3g}, "
        f"max {norms.max():.3g}"
    )
    vmap_seconds = best_seconds(lambda: vectorised(params, x, labels), arguments.repeats)
    loop_seconds = best_seconds(
        lambda: loop_of_grads(single_example_grad, params, x, labels),
        max(1, arguments.repeats // 2),
    )
    print(
        f"vmap(grad): {vmap_seconds * 1e3:9.3f} ms   loop of grad: {loop_seconds * 1e3:9.3f} ms"
        f"   speed-up {loop_seconds / vmap_seconds:.1f}x (best of repeats, compile excluded)"
    )
    scale = max(1.0, max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(with_loop)))
    tolerance = 1e-5 * scale  # float32 rounding, relative to the largest gradient entry
    if largest > tolerance or mean_gap > tolerance:
        print(f"per-example gradients disagree beyond {tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

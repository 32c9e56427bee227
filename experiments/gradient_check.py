"""Check the custom backward rule on the derivation's two toy networks, per parameter, in float64.

For each network, the gradient of ``mlp.loss`` (whose softmax cross-entropy backward is the
custom rule ``softmax(z) - y``) is compared with

- ``jax.grad`` of the naive composition ``-mean_n sum_k y_nk log(exp(s_nk) / sum_j exp(s_nj))``,
  written out here without the library,
- central finite differences ``(L(theta + eps e_i) - L(theta - eps e_i)) / (2 eps)``,
- for the output layer, the derived closed form ``dL/dscores = (yhat - y) / N``, so
  ``dL/dW2 = O1^T (yhat - y) / N + l2 W2`` and ``dL/db2 = sum_n (yhat_n - y_n) / N``.

The networks, from the source texts of docs/derivation.md: the backpropagation blog post's
``X [5, 4] -> 10 ReLU units -> 3 classes`` (labelled "seed 000", ``--network 000``) and the
question-and-answer thread's ``x [1, 2] -> 500 tanh units -> 2 classes`` (labelled "seed 002",
``--network 002``). Prints one row per (network, parameter, reference) with the largest absolute
difference and the largest relative difference ``|a - b| / max(|a|, |b|, 1e-6)``; exits with
status 1 if any exceeds its tolerance.

    python experiments/gradient_check.py
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)  # before any array exists: the check runs in float64

import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
from common import non_negative_float, positive_float, writable_file

from jaxsoftmax import data, mlp

RELATIVE_FLOOR = 1e-6  # below it a difference is judged by its absolute size
# (absolute, relative) tolerances: exact references agree to rounding, finite differences to
# their truncation and cancellation error (about eps^2 + 1e-16 / eps).
TOLERANCES = {
    "jax.grad of naive composition": (1e-12, 1e-8),
    "finite differences": (1e-8, 1e-3),
    "closed form (yhat - y) / N": (1e-12, 1e-8),
}
NETWORKS = {
    "seed 000: X[5,4] -> 10 relu -> 3": (data.toy_five_examples_four_features, [4, 10, 3], "relu"),
    "seed 002: x[1,2] -> 500 tanh -> 2": (data.toy_one_example_two_features, [2, 500, 2], "tanh"),
}
PARAMETER_NAMES = ("W1", "b1", "W2", "b2")


def naive_loss(params, x, labels, activation, l2):
    """The forward pass spelled out: no library loss, plain autodiff through every op."""
    f = {"relu": lambda z: jnp.maximum(z, 0.0), "tanh": jnp.tanh}[activation]
    hidden = f(x @ params[0]["W"] + params[0]["b"][None, :])
    scores = hidden @ params[1]["W"] + params[1]["b"][None, :]
    yhat = jnp.exp(scores) / jnp.sum(jnp.exp(scores), axis=1, keepdims=True)
    y = jax.nn.one_hot(labels, scores.shape[1], dtype=scores.dtype)
    penalty = 0.5 * l2 * (jnp.sum(params[0]["W"] ** 2) + jnp.sum(params[1]["W"] ** 2))
    return -jnp.mean(jnp.sum(y * jnp.log(yhat), axis=1)) + penalty


def finite_differences(loss_of_vector, theta, eps):
    """Central differences along every coordinate, all at once with vmap."""
    basis = eps * jnp.eye(theta.size, dtype=theta.dtype)
    plus = jax.vmap(loss_of_vector)(theta[None, :] + basis)
    minus = jax.vmap(loss_of_vector)(theta[None, :] - basis)
    return (plus - minus) / (2 * eps)


def output_layer_closed_form(params, x, labels, activation, l2):
    f = {"relu": lambda z: np.maximum(z, 0.0), "tanh": np.tanh}[activation]
    p = [{k: np.asarray(v) for k, v in layer.items()} for layer in params]
    hidden = f(x @ p[0]["W"] + p[0]["b"])
    scores = hidden @ p[1]["W"] + p[1]["b"]
    yhat = np.exp(scores - scores.max(axis=1, keepdims=True))
    yhat /= yhat.sum(axis=1, keepdims=True)
    y = np.eye(scores.shape[1])[labels]
    d_scores = (yhat - y) / len(x)
    return {"W2": hidden.T @ d_scores + l2 * p[1]["W"], "b2": d_scores.sum(axis=0)}


def differences(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    absolute = np.abs(a - b)
    relative = absolute / np.maximum(np.maximum(np.abs(a), np.abs(b)), RELATIVE_FLOOR)
    return float(absolute.max()), float(relative.max())


def by_name(params):
    return {"W1": params[0]["W"], "b1": params[0]["b"], "W2": params[1]["W"], "b2": params[1]["b"]}


def check_network(name, make_input, sizes, activation, *, seed, l2, eps):
    x, labels = make_input(seed)
    x = jnp.asarray(x, jnp.float64)
    labels = jnp.asarray(labels)
    params = mlp.init(jax.random.key(seed), sizes, scheme="glorot", dtype=jnp.float64)
    params = [  # non-zero biases, so their gradients are exercised away from the origin
        {
            "W": p["W"],
            "b": 0.1 * jax.random.normal(jax.random.key(seed + 1 + i), p["b"].shape, jnp.float64),
        }
        for i, p in enumerate(params)
    ]

    def library_loss(p):
        return mlp.loss(p, x, labels, l2=l2, activation=activation)

    custom = by_name(jax.jit(jax.grad(library_loss))(params))
    naive = by_name(
        jax.jit(jax.grad(naive_loss), static_argnums=3)(params, x, labels, activation, l2)
    )
    theta, unravel = ravel_pytree(params)
    numeric_vector = jax.jit(
        lambda t: finite_differences(lambda u: library_loss(unravel(u)), t, eps)
    )(theta)
    numeric = by_name(unravel(numeric_vector))
    closed = output_layer_closed_form(params, np.asarray(x), np.asarray(labels), activation, l2)
    references = {
        "jax.grad of naive composition": naive,
        "finite differences": numeric,
        "closed form (yhat - y) / N": closed,
    }
    rows = []
    for parameter in PARAMETER_NAMES:
        for reference, gradients in references.items():
            if parameter not in gradients:
                continue
            absolute, relative = differences(custom[parameter], gradients[parameter])
            atol, rtol = TOLERANCES[reference]
            rows.append(
                {
                    "network": name,
                    "parameter": parameter,
                    "shape": list(np.shape(custom[parameter])),
                    "reference": reference,
                    "max_abs": absolute,
                    "max_rel": relative,
                    "abs_tolerance": atol,
                    "rel_tolerance": rtol,
                    "ok": absolute <= atol and relative <= rtol,
                }
            )
    return rows


def build_parser():
    parser = common.script_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the networks' parameters")
    parser.add_argument(
        "--l2",
        type=non_negative_float,
        default=0.0,
        help="weight penalty included in L, >= 0",
    )
    parser.add_argument(
        "--eps", type=positive_float, default=1e-6, help="finite-difference step, > 0"
    )
    parser.add_argument(
        "--json",
        type=writable_file,
        default=None,
        help="also write the table to this file; None: do not",
    )
    parser.add_argument(
        "--network",
        choices=("000", "002", "both"),
        default="both",
        help="check only one network: 000 the blog post's, 002 the question-and-answer thread's",
    )
    common.add_cache_flag(parser)
    return parser


def print_table(rows: list[dict]) -> None:
    """One line per comparison: the network, the parameter, the reference, the largest
    differences and whether they are within tolerance."""
    header = (
        f"{'network':36} {'param':5} {'shape':10} {'reference':31} {'max abs':>9} {'max rel':>9}"
    )
    print(header + "  ok")
    print("-" * (len(header) + 4))
    for row in rows:
        shape = "x".join(str(s) for s in row["shape"])
        print(
            f"{row['network']:36} {row['parameter']:5} {shape:10} {row['reference']:31} "
            f"{row['max_abs']:9.2e} {row['max_rel']:9.2e}  {'yes' if row['ok'] else 'NO'}"
        )


def main(argv=None) -> int:
    arguments = common.parse_flags(build_parser(), argv)
    rows = []
    for name, (make_input, sizes, activation) in NETWORKS.items():
        if arguments.network != "both" and not name.startswith(f"seed {arguments.network}"):
            continue
        rows += check_network(
            name,
            make_input,
            sizes,
            activation,
            seed=arguments.seed,
            l2=arguments.l2,
            eps=arguments.eps,
        )
    print(
        f"device: {jax.devices()[0].platform}, dtype: float64, l2 = {arguments.l2}, "
        f"eps = {arguments.eps}; custom rule against each reference"
    )
    print_table(rows)
    failed = [row for row in rows if not row["ok"]]
    if arguments.json:
        common.write_json(arguments.json, {"tolerances": TOLERANCES, "rows": rows})
    if failed:
        print(
            f"\n{len(failed)} comparison(s) exceed their tolerance "
            "(absolute, relative): "
            + ", ".join(
                f"{r['network']} {r['parameter']} vs {r['reference']} "
                f"({r['abs_tolerance']:g}, {r['rel_tolerance']:g})"
                for r in failed
            ),
            file=sys.stderr,
        )
        return 1
    print(f"\nall {len(rows)} comparisons within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())

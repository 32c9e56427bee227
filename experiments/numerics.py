"""Accuracy: every public loss against float64, beside optax and the naive composition.

For each public loss of ``jaxsoftmax`` (the sharded ones are checked equal to their
single-device losses on a one-device mesh), in float32, bf16 and float16, at vocabularies of
1,000, 32,000 and 256,000 classes and logits of magnitude 1 to 1e4, the error of the loss and
of each of its gradients against float64 computed in NumPy from the definitions, from the same
rounded inputs (the bf16 or float16 inputs widened exactly). Beside it the same errors of
optax's loss on the same inputs (``optax.softmax_cross_entropy_with_integer_labels``,
``optax.softmax_cross_entropy``, ``optax.kl_divergence``) and of the naive composition with
``jax.nn.log_softmax``, both differentiated by JAX. PyTorch is not measured (not installed).

Two kinds of logits at each magnitude ``s``:

* ``spread``: ``z = s * N(0, 1)``, labels drawn uniformly (the loss is of the order of ``s``);
  the distillation teacher independent, drawn alike;
* ``offset``: ``z = s + N(0, 1)``, a trained model's logits drifted to magnitude ``s``, labels
  sampled from ``softmax(z)`` (the loss is a few nats however large ``s``); the teacher the
  student's logits plus ``N(0, 1/4)``.

The fused losses get hidden states and classifiers whose product has these logits
(``d = 16``; the offset is one hidden unit of value ``sqrt(s)`` in every token and class);
``linear_cross_entropy`` with its default ``method="auto"`` and with ``method="recompute"``.

Errors: a value's (loss, log-probability, entropy) is ``max |x - x64| / max(|x64|, 1)`` over
its rows (relative, absolute in nats below 1 nat); a gradient's is ``max |g - g64| / max size``
over its entries, ``size`` the sum of the absolute values of the terms the exact gradient is
the difference of (``p + onehot`` for ``p - onehot``): the worst entry in units of what the
gradient is made of, meaningful where the terms cancel too. results.json also holds ``max |g -
g64| / max |g64|`` and ``||g - g64||_2 / ||g64||_2``. A quantity whose exact value lies beyond
the dtype's largest number is marked ``ovf``, a gradient whose every term lies below its
smallest normal number ``unf``: no rounding can hold them, and they are left out of the worst
cases. docs/numerics.md says more.

    python experiments/numerics.py          # docs/numerics.md, benchmarks/results/<device>/numerics/
    python experiments/numerics.py --quick  # runs/numerics-quick/ (a smoke run, no doc)
    python experiments/numerics.py --from-results   # the doc and results.md again, from results.json

The whole grid compiles about 250 small programs: 7 minutes of CPU (9 of wall time) on the
2-core machine without JAX's compilation cache (``--no-compilation-cache``), about half with it.
An interrupted run, started again with the same flags, resumes after its last finished case
(``--fresh`` starts over); the results are written atomically at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import zlib
from collections.abc import Callable

# The references' float64 products are small: OpenBLAS's threads only spin on the shared cores
# (8 times the CPU time of one thread here). Set before NumPy starts.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# helper modules of the scripts: flags and the compilation cache; resuming an interrupted run
import common  # noqa: E402
import harness  # noqa: E402

import jaxsoftmax  # noqa: E402
from jaxsoftmax import training  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
VOCABULARIES = {1000: 64, 32000: 16, 256000: 4}  # V: rows N
SCALES = (1.0, 10.0, 100.0, 1e3, 1e4)
REGIMES = ("spread", "offset")
WIDTH = 16  # d of the fused losses' hidden states (the teacher's: WIDTH + 16)
SHARDED_VOCABULARY = 32000  # the one-device-mesh check of the sharded losses
QUICK = dict(vocabularies={1000: 8}, scales=(1.0, 1e4), dtypes=("float32", "bfloat16"))
QUICK_OUT = os.path.join("runs", "numerics-quick")  # never committed
IMPLEMENTATIONS = ("ours", "optax", "naive")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


# ---------------------------------------------------------------------------------------------
# Inputs: drawn in float64, rounded to the dtype; the reference sees the rounded values.


def rounded(x: np.ndarray, dtype: str) -> tuple[jax.Array, np.ndarray]:
    """``x`` rounded to ``dtype`` (a JAX array) and the same values exactly in float64."""
    low = jnp.asarray(x.astype(np.float32), dtype)
    return low, np.asarray(low, np.float64)


def sampled_labels(rng, z64: np.ndarray) -> np.ndarray:
    """One label per row drawn from ``softmax(z64)`` (the Gumbel-max trick)."""
    return np.argmax(z64 + rng.gumbel(size=z64.shape), axis=-1).astype(np.int32)


def softmax64(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax64(z))


def log_softmax64(z: np.ndarray) -> np.ndarray:
    shifted = z - np.max(z, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def logits_inputs(rng, n, v, scale, regime, dtype):
    """``(low, exact)`` dicts: student logits ``z``, teacher logits ``t``, probability labels
    ``y_prob`` (the teacher's softmax, rounded) and integer ``labels``."""
    noise = rng.standard_normal((n, v))
    if regime == "spread":
        z, z64 = rounded(scale * noise, dtype)
        t, t64 = rounded(scale * rng.standard_normal((n, v)), dtype)
        labels = rng.integers(0, v, n).astype(np.int32)
    else:
        z, z64 = rounded(scale + noise, dtype)
        t, t64 = rounded(z64 + 0.5 * rng.standard_normal((n, v)), dtype)
        labels = sampled_labels(rng, z64)
    y_prob, y_prob64 = rounded(softmax64(t64), dtype)
    low = dict(z=z, t=t, y_prob=y_prob, labels=jnp.asarray(labels))
    return low, dict(z=z64, t=t64, y_prob=y_prob64, labels=labels)


def linear_inputs(rng, n, v, scale, regime, dtype):
    """``(low, exact)`` dicts: the student's ``h [N, d]`` and ``w [V, d]``, the teacher's ``ht
    [N, d + 16]`` and ``wt [V, d + 16]``, integer ``labels``: ``h w^T`` has the regime's logits."""
    d, extra = WIDTH, 16
    if regime == "spread":
        root = math.sqrt(scale)
        h = root * rng.standard_normal((n, d))
        w = root * rng.standard_normal((v, d)) / math.sqrt(d)
        ht = root * rng.standard_normal((n, d + extra))
        wt = root * rng.standard_normal((v, d + extra)) / math.sqrt(d + extra)
    else:  # one unit of sqrt(s) in every token and class: z = s + N(0, 1)
        column = lambda rows: np.full((rows, 1), math.sqrt(scale))
        h = np.hstack([column(n), rng.standard_normal((n, d - 1))])
        w = np.hstack([column(v), rng.standard_normal((v, d - 1)) / math.sqrt(d - 1)])
        ht = np.hstack([h, 0.5 * rng.standard_normal((n, extra))])
        wt = np.hstack([w, rng.standard_normal((v, extra)) / math.sqrt(extra)])
    low, exact = {}, {}
    for name, x in dict(h=h, w=w, ht=ht, wt=wt).items():
        low[name], exact[name] = rounded(x, dtype)
    if regime == "spread":
        labels = rng.integers(0, v, n).astype(np.int32)
    else:
        labels = sampled_labels(rng, exact["h"] @ exact["w"].T)
    low["labels"], exact["labels"] = jnp.asarray(labels), labels
    return low, exact


# ---------------------------------------------------------------------------------------------
# The float64 references, from the definitions: each returns ``(values, gradients)``, the
# gradients ``[output][input]`` of the sum of each output over its rows, each as a pair
# ``(gradient, size)``: ``size`` is the sum of the absolute values of the terms the gradient is
# the difference of (``p + onehot`` for ``p - onehot``), the scale its rounding errors are
# measured against.


def one_hot(labels, v):
    out = np.zeros((len(labels), v))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def reference_cross_entropy_rows(z, labels):
    """Per-row ``-log softmax(z)_y`` and its gradient ``softmax(z) - onehot(y)``."""
    logp = log_softmax64(z)
    rows = -logp[np.arange(len(labels)), labels]
    p, y = np.exp(logp), one_hot(labels, z.shape[-1])
    return rows, (p - y, p + y)


def reference_kl_rows(s, t):
    """Per-row ``KL(q || p)``, ``p = softmax(s)``, ``q = softmax(t)``, and its gradients
    ``p - q`` (student) and ``q (log q - log p - KL)`` (teacher)."""
    log_p, log_q = log_softmax64(s), log_softmax64(t)
    p, q = np.exp(log_p), np.exp(log_q)
    kl = np.sum(q * (log_q - log_p), axis=-1)[:, None]
    teacher = (q * (log_q - log_p - kl), q * (np.abs(log_q - log_p) + np.abs(kl)))
    return kl[:, 0], (p - q, p + q), teacher


def reference_token_rows(z, labels):
    """Per-row ``log p_y`` and ``H``, and their gradients ``onehot - p``, ``-p (log p + H)``."""
    logp = log_softmax64(z)
    p, y = np.exp(logp), one_hot(labels, z.shape[-1])
    entropy = -np.sum(p * logp, axis=-1)[:, None]
    log_p_y = logp[np.arange(len(labels)), labels]
    d_entropy = (-p * (logp + entropy), p * (np.abs(logp) + entropy))
    return (log_p_y, entropy[:, 0]), ((y - p, y + p), d_entropy)


def scaled(pair, factor):
    return tuple(x * factor for x in pair)


def through_classifier(pair, h, w):
    """``dL/dh = G W`` and ``dL/dW = G^T h`` for ``z = h W^T`` and ``dL/dz = G`` (their sizes
    the same products of the absolute values)."""
    (g, size), h_abs, w_abs = pair, np.abs(h), np.abs(w)
    return [(g @ w, size @ w_abs), (g.T @ h, size.T @ h_abs)]


# ---------------------------------------------------------------------------------------------
# The losses: each with its differentiated inputs, its call in jaxsoftmax, optax's loss and the
# naive composition (None where there is none), and its reference.


@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    family: str  # "logits" or "linear": which inputs
    inputs: tuple[str, ...]  # the differentiated inputs, in order
    outputs: tuple[str, ...]  # the values returned, per row or reduced
    ours: Callable
    optax: Callable | None  # None: optax has no such loss
    naive: Callable | None  # None: measured under another name (the same composition)
    reference: Callable  # exact inputs -> (values, gradients [output][input])
    constants: tuple[str, ...] = ("labels",)  # the inputs not differentiated, after those
    value_dtype: str | None = None  # the dtype of the values returned (None: the inputs')


def naive_nll(z, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], -1)[:, 0]


def naive_kl(s, t):
    log_q = jax.nn.log_softmax(t)
    return jnp.sum(jnp.exp(log_q) * (log_q - jax.nn.log_softmax(s)), -1)


def optax_kl(s, t):
    return optax.losses.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t))


def naive_token(z, labels):
    log_p = jax.nn.log_softmax(z)
    picked = jnp.take_along_axis(log_p, labels[:, None], -1)[:, 0]
    return picked, -jnp.sum(jnp.exp(log_p) * log_p, -1)


def mean(x):
    return jnp.mean(x)


def ref_cross_entropy(x):
    rows, g = reference_cross_entropy_rows(x["z"], x["labels"])
    return [rows.mean()], [[scaled(g, 1 / len(rows))]]


def ref_integer_rows(x):
    rows, g = reference_cross_entropy_rows(x["z"], x["labels"])
    return [rows], [[g]]


def ref_probability_rows(x):
    logp = log_softmax64(x["z"])
    y = x["y_prob"]
    rows = -np.sum(y * logp, -1)
    p_total = np.exp(logp) * y.sum(-1, keepdims=True)
    return [rows], [[(p_total - y, p_total + y), (-logp, np.abs(logp))]]


def ref_linear_cross_entropy(x):
    rows, g = reference_cross_entropy_rows(x["h"] @ x["w"].T, x["labels"])
    return [rows.mean()], [through_classifier(scaled(g, 1 / len(rows)), x["h"], x["w"])]


def ref_distillation(x):
    kl, d_s, d_t = reference_kl_rows(x["z"], x["t"])
    n = len(kl)
    return [kl.mean()], [[scaled(d_s, 1 / n), scaled(d_t, 1 / n)]]


def ref_linear_distillation(x):
    kl, d_s, d_t = reference_kl_rows(x["h"] @ x["w"].T, x["ht"] @ x["wt"].T)
    n = len(kl)
    student = through_classifier(scaled(d_s, 1 / n), x["h"], x["w"])
    return [kl.mean()], [student + through_classifier(scaled(d_t, 1 / n), x["ht"], x["wt"])]


def ref_token(x):
    values, grads = reference_token_rows(x["z"], x["labels"])
    return list(values), [[g] for g in grads]


def ref_linear_token(x):
    values, grads = reference_token_rows(x["h"] @ x["w"].T, x["labels"])
    return list(values), [through_classifier(g, x["h"], x["w"]) for g in grads]


LOSSES = (
    Loss("cross_entropy", "logits", ("z",), ("loss",),
         ours=lambda z, labels: jaxsoftmax.cross_entropy(z, labels),
         optax=lambda z, labels: mean(optax.softmax_cross_entropy_with_integer_labels(z, labels)),
         naive=lambda z, labels: mean(naive_nll(z, labels)),
         reference=ref_cross_entropy),
    Loss("softmax_cross_entropy_with_integer_labels", "logits", ("z",), ("loss",),
         ours=jaxsoftmax.softmax_cross_entropy_with_integer_labels,
         optax=optax.softmax_cross_entropy_with_integer_labels,
         naive=naive_nll, reference=ref_integer_rows),
    Loss("softmax_cross_entropy", "logits", ("z", "y_prob"), ("loss",),
         ours=jaxsoftmax.softmax_cross_entropy, optax=optax.softmax_cross_entropy,
         naive=lambda z, y: -jnp.sum(y * jax.nn.log_softmax(z), -1),
         reference=ref_probability_rows, constants=()),
    Loss("linear_cross_entropy", "linear", ("h", "w"), ("loss",),
         ours=lambda h, w, labels: jaxsoftmax.linear_cross_entropy(h, w, labels),
         optax=lambda h, w, labels: mean(
             optax.softmax_cross_entropy_with_integer_labels(h @ w.T, labels)),
         naive=lambda h, w, labels: mean(naive_nll(h @ w.T, labels)),
         reference=ref_linear_cross_entropy),
    Loss("linear_cross_entropy, method='recompute'", "linear", ("h", "w"), ("loss",),
         ours=lambda h, w, labels: jaxsoftmax.linear_cross_entropy(
             h, w, labels, method="recompute"),
         optax=None, naive=None, reference=ref_linear_cross_entropy),
    Loss("distillation_loss", "logits", ("z", "t"), ("loss",),
         ours=lambda s, t: jaxsoftmax.distillation_loss(s, t),
         optax=lambda s, t: mean(optax_kl(s, t)),
         naive=lambda s, t: mean(naive_kl(s, t)),
         reference=ref_distillation, constants=()),
    Loss("linear_distillation_loss", "linear", ("h", "w", "ht", "wt"), ("loss",),
         ours=lambda h, w, ht, wt: jaxsoftmax.linear_distillation_loss(h, w, ht, wt),
         optax=lambda h, w, ht, wt: mean(optax_kl(h @ w.T, ht @ wt.T)),
         naive=lambda h, w, ht, wt: mean(naive_kl(h @ w.T, ht @ wt.T)),
         reference=ref_linear_distillation, constants=()),
    Loss("token_log_probs", "logits", ("z",), ("log p", "entropy"),
         ours=lambda z, labels: jaxsoftmax.token_log_probs(z, labels, return_entropy=True),
         optax=None, naive=naive_token, reference=ref_token,
         value_dtype="float32"),
    Loss("linear_token_log_probs", "linear", ("h", "w"), ("log p", "entropy"),
         ours=lambda h, w, labels: jaxsoftmax.linear_token_log_probs(
             h, w, labels, return_entropy=True),
         optax=None, naive=lambda h, w, labels: naive_token(h @ w.T, labels),
         reference=ref_linear_token, value_dtype="float32"),
)  # fmt: skip
BY_NAME = {loss.name: loss for loss in LOSSES}


def sharded_losses(mesh) -> dict[str, tuple[str, Callable]]:
    """The sharded losses on ``mesh`` (one device, its axis ``"model"``): ``name -> (the
    single-device loss it equals, its call)``. The sharded fused loss has no ``method``: it
    recomputes, so its single-device twin is ``method="recompute"``."""
    on = dict(mesh=mesh, class_axis_name="model")
    return {
        "sharded_cross_entropy": ("cross_entropy", lambda z, labels: (
            jaxsoftmax.sharded_cross_entropy(z, labels, **on))),
        "sharded_linear_cross_entropy": ("linear_cross_entropy, method='recompute'", (
            lambda h, w, labels: jaxsoftmax.sharded_linear_cross_entropy(h, w, labels, **on))),
        "sharded_linear_distillation_loss": ("linear_distillation_loss", (
            lambda h, w, ht, wt: jaxsoftmax.sharded_linear_distillation_loss(h, w, ht, wt, **on))),
        "sharded_linear_token_log_probs": ("linear_token_log_probs", (
            lambda h, w, labels: jaxsoftmax.sharded_linear_token_log_probs(
                h, w, labels, return_entropy=True, **on))),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Evaluation: every output and the gradient of each output's sum, in one compiled program.


def compiled(fn: Callable) -> Callable:
    """``(inputs, constants) -> (values, gradients [output][input])`` of ``fn``, jitted."""

    def run(inputs, constants):
        outs, pullback = jax.vjp(lambda *x: fn(*x, *constants), *inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = []
        for k in range(len(outs)):
            cotangent = tuple(jnp.ones_like(o) if j == k else jnp.zeros_like(o)
                              for j, o in enumerate(outs))  # fmt: skip
            grads.append(pullback(cotangent if len(outs) > 1 else cotangent[0]))
        return outs, grads

    return jax.jit(run)


def value_error(x, exact) -> float:
    """``max |x - x64| / max(|x64|, 1)`` over the rows; inf where ``x`` is not finite."""
    x, exact = np.asarray(x, np.float64).ravel(), np.asarray(exact, np.float64).ravel()
    with np.errstate(invalid="ignore"):
        error = np.abs(x - exact) / np.maximum(np.abs(exact), 1.0)
    return float(np.max(np.where(np.isfinite(x), error, np.inf)))


def gradient_errors(g, exact, size) -> list[float]:
    """``[error, relative, normwise]``: ``max |g - g64| / max size`` (``size``: the absolute
    terms of the gradient, see the references), ``max |g - g64| / max |g64|`` and ``||g -
    g64||_2 / ||g64||_2``. All inf where ``g`` is not finite."""
    g, exact = np.asarray(g, np.float64), np.asarray(exact, np.float64)
    if not np.all(np.isfinite(g)):
        return [math.inf] * 3
    worst = np.max(np.abs(g - exact))
    divide = lambda x, y: float(x / y) if y > 0 else (0.0 if x == 0 else math.inf)
    return [
        divide(worst, np.max(size)),
        divide(worst, np.max(np.abs(exact))),
        divide(np.linalg.norm(g - exact), np.linalg.norm(exact)),
    ]


def stored(x: float) -> float | str:
    """An error as results.json keeps it: 3 significant digits; ``"inf"`` or ``"nan"`` (JSON
    has no such numbers). :func:`error_of` reads it back."""
    return float(f"{x:.3g}") if math.isfinite(x) else str(x)


def error_of(errors) -> float:
    """The headline error of a stored entry (``[error, ...]``)."""
    return float(errors[0])


def quantity_names(loss: Loss) -> list[str]:
    """``loss``, ``d loss/d z``, ...: the measured quantities of ``loss``, in order."""
    names = list(loss.outputs)
    for output in loss.outputs:
        names += [f"d {output}/d {name}" for name in loss.inputs]
    return names


def errors_of(loss: Loss, result, values64, grads64) -> dict:
    """``{quantity: [error]}`` for each value, ``{quantity: [error, relative, normwise]}`` for
    each gradient (:func:`gradient_errors`), of one implementation's result."""
    values, grads = result
    found = {}
    for name, x, exact in zip(loss.outputs, values, values64, strict=True):
        found[name] = [stored(value_error(x, exact))]
    for output, row, exact_row in zip(loss.outputs, grads, grads64, strict=True):
        for name, g, (exact, size) in zip(loss.inputs, row, exact_row, strict=True):
            found[f"d {output}/d {name}"] = [stored(e) for e in gradient_errors(g, exact, size)]
    return found


def overflowing(loss: Loss, values64, grads64, dtype: str) -> list[str]:
    """The quantities with an exact entry beyond the largest finite number of the dtype ours
    returns them in (the inputs' dtype, float32 for the log-probabilities)."""
    largest = [float(jnp.finfo(loss.value_dtype or dtype).max)] * len(values64)
    largest += [float(jnp.finfo(dtype).max)] * sum(len(row) for row in grads64)
    flat = list(values64) + [g for row in grads64 for g, _ in row]
    names = quantity_names(loss)
    return [n for n, x, top in zip(names, flat, largest, strict=True) if np.max(np.abs(x)) > top]


def underflowing(loss: Loss, grads64, dtype: str) -> list[str]:
    """The gradients whose every term lies below ``dtype``'s smallest normal number (a confident
    row's entropy gradient, ``1e-50``): the dtype holds none of them to any relative precision."""
    tiny = float(jnp.finfo(dtype).tiny)
    sizes = [size for row in grads64 for _, size in row]
    names = quantity_names(loss)[len(loss.outputs) :]
    return [name for name, size in zip(names, sizes, strict=True) if np.max(size) < tiny]


def draw(loss: Loss, n, v, scale, regime, dtype):
    """The inputs of one row of the table, the same for every implementation (and every loss
    of the family): seeded by the family, ``V``, the scale and the regime."""
    seed = zlib.crc32(f"{loss.family} {v} {scale} {regime} {dtype}".encode())
    make = logits_inputs if loss.family == "logits" else linear_inputs
    return make(np.random.default_rng(seed), n, v, scale, regime, dtype)


def case_rows(loss: Loss, dtype: str, v: int, n: int, scales, sharded: Callable | None = None):
    """The rows of one loss, dtype and vocabulary: every scale and regime, the errors of each
    implementation (with ``sharded``, the sharded loss beside ours instead of the others)."""
    implementations = {"ours": loss.ours}
    if sharded is not None:
        implementations["sharded"] = sharded
    else:
        if loss.naive is not None:
            implementations["naive"] = loss.naive
        if loss.optax is not None:
            implementations["optax"] = loss.optax
    programs = {name: compiled(fn) for name, fn in implementations.items()}
    rows = []
    for regime in REGIMES:
        for scale in scales:
            low, exact = draw(loss, n, v, scale, regime, dtype)
            values64, grads64 = loss.reference(exact)
            inputs = tuple(low[name] for name in loss.inputs)
            constants = tuple(low[name] for name in loss.constants)
            results = {name: jax.device_get(program(inputs, constants))
                       for name, program in programs.items()}  # fmt: skip
            row = dict(
                loss=loss.name, dtype=dtype, V=v, N=n, scale=scale, regime=regime,
                overflow=overflowing(loss, values64, grads64, dtype),
                underflow=underflowing(loss, grads64, dtype),
                errors={name: errors_of(loss, r, values64, grads64) for name, r in results.items()},
            )  # fmt: skip
            if sharded is not None:
                row["sharded"] = True  # the single-device loss is row["loss"]
                row["sharded_difference"] = largest_difference(results["ours"], results["sharded"])
            rows.append(row)
    worst = max(
        found[0] for kind in ("value", "gradient") if (found := worst_of(rows, "ours", kind))
    )
    print(f"[{loss.name} {dtype} V={v}] ours' worst error {worst:.2e}", flush=True)
    return rows


def largest_difference(a, b) -> float:
    """The largest absolute difference between two results' every value and gradient."""
    flat = lambda r: [np.asarray(x, np.float64) for x in jax.tree.leaves(r)]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(flat(a), flat(b), strict=True))


# ---------------------------------------------------------------------------------------------
# The tables


def cell(error: float, mark: str = "") -> str:
    """An error as a table shows it; ``mark`` (``ovf``, ``unf``) in place of a number."""
    if mark:
        return mark
    if not math.isfinite(error):
        return "**inf**" if error > 0 else "**nan**"
    return f"{error:.1e}"


def worst_of(rows, implementation: str, kind: str):
    """``(error, row, quantity)`` of the worst ``kind`` (``"value"`` or ``"gradient"``) error of
    ``implementation`` over ``rows``, leaving out quantities whose exact value overflows; None
    if none. Non-finite results count as infinite."""
    found = None
    for row in rows:
        for quantity, e in row["errors"].get(implementation, {}).items():
            if (quantity.startswith("d ")) != (kind == "gradient") or excluded(row, quantity):
                continue
            if found is None or not error_of(e) <= found[0]:
                found = (error_of(e), row, quantity)
    return found


def excluded(row, quantity: str) -> str:
    """``"ovf"`` or ``"unf"`` for a quantity the dtype cannot hold, else ``""``."""
    if quantity in row["overflow"]:
        return "ovf"
    return "unf" if quantity in row.get("underflow", ()) else ""


def where(found) -> str:
    if found is None:
        return ""
    _, row, quantity = found
    return f"{quantity}, V {row['V']}, {row['regime']} {row['scale']:g}"


def summary_table(rows) -> list[str]:
    """Per loss and dtype: the worst value and gradient errors over the grid, each
    implementation side by side, and where ours' worst is."""
    lines = harness.markdown_table(
        [
            "loss",
            "dtype",
            "value: ours",
            "optax",
            "naive",
            "gradient: ours",
            "optax",
            "naive",
            "ours' worst gradient at",
        ],  # fmt: skip
        [],
    )
    for loss in LOSSES:
        for dtype in DTYPES:
            mine = [r for r in rows if r["loss"] == loss.name and r["dtype"] == dtype]
            if not mine:
                continue
            cells = [loss.name, dtype]
            for kind in ("value", "gradient"):
                for implementation in IMPLEMENTATIONS:
                    found = worst_of(mine, implementation, kind)
                    cells.append("-" if found is None else cell(found[0]))
            cells.append(where(worst_of(mine, "ours", "gradient")))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def detail_table(rows, loss_name: str, v: int) -> list[str]:
    """One loss at one vocabulary: every dtype, regime and scale, each quantity's error for
    each implementation (``ours / optax / naive``)."""
    mine = [r for r in rows if r["loss"] == loss_name and r["V"] == v]
    if not mine:
        return []
    quantities = list(mine[0]["errors"]["ours"])
    present = [i for i in IMPLEMENTATIONS if i in mine[0]["errors"]]
    lines = harness.markdown_table(
        ["dtype", "logits", *[f"{q}: {' / '.join(present)}" for q in quantities]], []
    )
    for row in mine:
        cells = [row["dtype"], f"{row['regime']} {row['scale']:g}"]
        for q in quantities:
            cells.append(" / ".join(
                cell(error_of(row["errors"][i][q]), excluded(row, q)) for i in present
            ))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def full_table(rows) -> list[str]:
    """Every row of the grid, for results.md."""
    lines = []
    for loss in LOSSES:
        for v in sorted({r["V"] for r in rows}):
            table = detail_table(rows, loss.name, v)
            if table:
                lines += [f"### {loss.name}, V = {v:,}", "", *table, ""]
    return lines


def sharded_lines(rows) -> list[str]:
    """Per sharded loss and dtype: how many rows are bitwise the single-device loss's, and
    the worst value and gradient errors of both."""
    checked = [r for r in rows if r.get("sharded")]
    if not checked:
        return ["(not run)"]
    lines = harness.markdown_table(
        ["loss on a one-device mesh (its twin)", "dtype", "rows bitwise equal", "value: sharded / single",
         "gradient: sharded / single"], []
    )  # fmt: skip
    for sharded_name, (name, _) in sharded_losses(None).items():
        for dtype in DTYPES:
            mine = [r for r in checked if r["loss"] == name and r["dtype"] == dtype]
            if not mine:
                continue
            equal = sum(r["sharded_difference"] == 0 for r in mine)
            cells = [f"{sharded_name} (`{name}`)", dtype, f"{equal} of {len(mine)}"]
            for kind in ("value", "gradient"):
                found = [worst_of(mine, i, kind) for i in ("sharded", "ours")]
                cells.append(" / ".join("-" if f is None else cell(f[0]) for f in found))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(path, meta, rows):
    """results.md: the setting, the summary and every row."""
    single = [row for row in rows if not row.get("sharded")]
    lines = [
        "# Accuracy of every public loss against float64 (all rows)",
        "",
        f"Device: {meta['device']}; JAX {meta['jax']}, optax {meta['optax']}, jaxsoftmax "
        f"{meta['jaxsoftmax']}; command: `{meta['command']}`. Definitions and discussion: "
        "docs/numerics.md. Cells are `ours / optax / naive` (`ours / naive` without an optax "
        "loss); `ovf`: the exact value lies beyond the dtype's range.",
        "",
        "## Worst over the grid",
        "",
        *summary_table(single),
        "",
        "## Sharded losses on a one-device mesh, beside their single-device twins",
        "",
        *sharded_lines(rows),
        "",
        "## Every row",
        "",
        *full_table(single),
    ]
    training.write_atomically(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# docs/numerics.md: the prose below, the tables from the rows.

PRECISION = """\
| loss | the inputs | sums over the vocabulary | the value returned | the gradients returned |
|---|---|---|---|---|
| `cross_entropy`, `softmax_cross_entropy`, `softmax_cross_entropy_with_integer_labels` | widened to float32, exactly | float32, as `m = max z` and `log sum exp(z - m)`, kept apart | float32 rounded once to the logits' dtype (the mean too: reduced in float32) | `(softmax - q) g` in float32 from `m` and `log sum`, rounded once |
| `distillation_loss` | both widened to the wider one's compute dtype | float32: each softmax's `m` and `log sum`, then the KL terms | float32 rounded once to the student's dtype | float32, rounded once to each input's dtype |
| `token_log_probs` | widened to float32 | float32 | **float32** (float64 for float64) for log-probabilities and entropy | float32, rounded once |
| `linear_cross_entropy`, `linear_distillation_loss` | the products' operands stay in their dtype; each tile of logits is summed in float32 (`preferred_element_type`) | float32, per tile, merged online | float32 rounded once to `hidden`'s dtype | each tile's `dL/dz` in float32, rounded to the inputs' dtype for the products (as the naive composition's are); `dL/dh` summed over every vocabulary tile in float32, `dL/dW` over the token tiles in `accumulation_dtype` (float32), each rounded once at the end |
| `linear_token_log_probs` | as above | float32 | **float32** | as above |
| optax, `jax.nn.log_softmax` (the comparison) | kept in their dtype | `z - max`, `exp`, `log` and `lse = max + log sum` in the logits' dtype; JAX sums bf16 and float16 in float32 inside `jnp.sum` and rounds the sum | the logits' dtype | autodiff in the logits' dtype |

float64 inputs are computed in float64 throughout. The sharded losses run the same code on each
shard and combine per-row float32 statistics (`psum`, `pmax`), so the table holds for them too.
"""

METHOD = """\
**Inputs.** For each vocabulary `V` (1,000, 32,000 and 256,000, with N = 64, 16 and 4 rows),
each magnitude `s` (1, 10, 100, 1e3, 1e4) and dtype (float32, bf16, float16), two kinds of
logits, drawn in float64 and rounded once to the dtype:

* **spread**: `z = s N(0, 1)`, labels drawn uniformly: a wrong, confident model whose loss is of
  the order of `s` (tens of thousands of nats at 1e4); the distillation teacher drawn alike,
  independently; the probability labels of `softmax_cross_entropy` the teacher's softmax;
* **offset**: `z = s + N(0, 1)`, a trained model's logits drifted to magnitude `s` (what z-loss
  prevents), labels sampled from `softmax(z)`: a loss of a few nats however large `s`; the
  teacher the student's logits plus `N(0, 1/4)`.

The fused losses get `h [N, 16]` and `W [V, 16]` (the teacher `[.., 32]`) whose product has
these logits; in the offset kind one hidden unit of value `sqrt(s)` in every token and class
carries the offset. `linear_cross_entropy` runs with its default `method="auto"` (which takes
`"forward"` at these small `V d`) and with `method="recompute"` (what `"auto"` takes for a
language model's `V d > 2^26`).

**Reference.** float64 NumPy, from the definitions, from the *same rounded inputs* (each bf16
or float16 value widened exactly): `log softmax(z) = (z - max) - log sum exp(z - max)`, the
loss `-log softmax(z)_y` (or `-sum_c y_c log softmax(z)_c`), `KL(q || p)`, `log p_y` and
`H = -sum p log p`, and the gradients from their closed forms (`softmax - onehot`, `p sum y -
y` and `-log softmax` for the labels, `p - q` and `q (log q - log p - KL)`, `onehot - p` and
`-p (log p + H)`, then `G W` and `G^T h` through the classifier). No code of the library or of
JAX is in the reference. So the errors below are the computations' own: the rounding of the
inputs is not counted, and every implementation is judged on the same numbers.

**Errors.** A value (a loss, a log-probability, an entropy) is judged by `max |x - x64| /
max(|x64|, 1)` over its rows: its relative error, and below one nat its absolute error in nats.
Reduced losses (`cross_entropy`, the fused and distillation losses) are their mean, as
returned; the per-example losses (the optax drop-ins, the log-probabilities) each row. A
gradient is judged by `max |g - g64| / max size`, where `size` sums the absolute values of the
terms the exact gradient is the difference of (`p + onehot` for `p - onehot`; `|G| |W|` for
`G W`): the worst entry's error in units of what the gradient is made of. Where the terms do
not cancel, `max size` is within a factor 2 of `max |g64|` and this is the max-abs relative
error; where they cancel (all logits rounded to one value, `p = q` exactly, the offset unit's
`sum_c (p_c - onehot_c) sqrt(s) = 0`), the exact gradient is 0 or tiny and a relative error
is meaningless for any finite precision, while this one still says how many units of the
rounding were lost. results.json holds each gradient's `[error, relative, normwise]`: this
one, `max |g - g64| / max |g64|` and `||g - g64||_2 / ||g64||_2`. What a dtype can hold sets
the floor: its unit roundoff `u` is 2^-24 = 6.0e-8 for float32, 2^-8 = 3.9e-3 for bf16,
2^-11 = 4.9e-4 for float16: a value rounded once to the dtype is within `u` of itself. A
quantity whose exact value lies beyond the dtype's largest number (65,504 for float16) is
marked `ovf` and left out of the worst cases: no rounding can hold it, and inf is the correct
float16 result. Likewise `unf`, a gradient whose every term lies below the dtype's smallest
normal number (the entropy's gradient of a row that is certain, 1e-50 in float64).
"""


def worst_rows(rows, dtype: str, count: int) -> list[str]:
    """The ``count`` largest of ours' errors in ``dtype``: one line each, with optax's or the
    naive composition's error on the same quantity."""
    found = []
    for row in (r for r in rows if r["dtype"] == dtype):
        for quantity, e in row["errors"]["ours"].items():
            if excluded(row, quantity):
                continue
            others = {i: error_of(row["errors"][i][quantity])
                      for i in ("optax", "naive") if i in row["errors"]}  # fmt: skip
            found.append((error_of(e), row, quantity, others))
    found.sort(key=lambda item: -item[0])
    lines = []
    for error, row, quantity, others in found[:count]:
        beside = ", ".join(f"{i} {cell(x)}" for i, x in others.items())
        lines.append(
            f"| {row['loss']} | {quantity} | {row['V']:,} | {row['regime']} {row['scale']:g} | "
            f"{cell(error)} | {beside or '-'} |"
        )
    return lines


def overflow_lines(rows) -> list[str]:
    """Which quantities overflow float16 exactly, and what each implementation returned."""
    lines = []
    for row in rows:
        for quantity in row["overflow"]:
            mine = error_of(row["errors"]["ours"][quantity])
            lines.append(f"{row['loss']} {quantity} (V {row['V']:,}, {row['regime']} "
                         f"{row['scale']:g}): ours {cell(mine)}")  # fmt: skip
    return lines


def render(meta, rows) -> str:
    """docs/numerics.md from the rows of a run."""
    single = [row for row in rows if not row.get("sharded")]
    headline = "softmax_cross_entropy_with_integer_labels"
    largest_v = max(row["V"] for row in single)
    overflowed = sorted({f"`{row['loss']}` ({', '.join(row['overflow'])})"
                         for row in single if row["overflow"]})  # fmt: skip
    worst = []
    for dtype in DTYPES:
        worst += [f"**{dtype}**", "", *harness.markdown_table(
            ["loss", "quantity", "V", "logits", "ours", "beside it"], []
        ), *worst_rows(single, dtype, 4), ""]  # fmt: skip
    text = [
        "# Numerics: every loss against float64",
        "",
        "How far each public loss and each of its gradients is from the exact answer, in "
        "float32, bf16 and float16, at vocabularies of 1,000 to 256,000 classes and logits of "
        "magnitude 1 to 10,000, beside optax's losses and the naive `jax.nn.log_softmax` "
        "composition on the same inputs. Measured on the device "
        f"`{meta['device']}` with JAX {meta['jax']}, optax {meta['optax']} and NumPy "
        f"{meta['numpy']}. `python experiments/numerics.py` writes this page and "
        "[benchmarks/results/cpu/numerics/](../benchmarks/results/cpu/numerics/results.md) "
        "(every row; results.json holds every error); this run: "
        f"`{meta['command']}`.",
        "",
        "## In short",
        "",
        *findings(single),
        "## What is computed in which precision",
        "",
        PRECISION,
        "## How it is measured",
        "",
        METHOD,
        "## The worst error of each loss over the grid",
        "",
        "Worst over every vocabulary, magnitude and kind of logits, for the value(s) and for "
        "every gradient of each loss (ours, optax's loss, the naive composition; `-`: none). "
        "optax's column is `optax.softmax_cross_entropy_with_integer_labels` (its mean for the "
        "reduced losses, of `h @ W.T` for the fused ones), `optax.softmax_cross_entropy`, and "
        "`optax.kl_divergence(log_softmax(z_s), softmax(z_t))` for distillation; optax has no "
        "token log-probability. Quantities whose exact value overflows the dtype are left out "
        f"(in float16: {'; '.join(overflowed) or 'none'}).",
        "",
        *summary_table(single),
        "",
        f"## The optax drop-in at V = {largest_v:,}",
        "",
        f"`{headline}` against optax's function of the same name and the naive "
        "`-log_softmax(z)[y]`, every row: `ours / optax / naive`.",
        "",
        *detail_table(single, headline, largest_v),
        "",
        "## The worst cases, and the tests that keep them",
        "",
        "Ours' four largest errors in each dtype, with optax's and the naive composition's on "
        "the same quantity:",
        "",
        *worst,
        TESTS,
        "## The sharded losses",
        "",
        "Each sharded loss runs the single-device loss's code on each shard and combines "
        "per-row statistics across the mesh (`psum`, `pmax`). On a one-device mesh, at "
        f"V = {SHARDED_VOCABULARY:,} over the same magnitudes, kinds and dtypes, each is "
        "against its single-device twin (the sharded fused loss always recomputes, so its twin "
        "is `method='recompute'`):",
        "",
        *sharded_lines(rows),
        "",
        sharded_verdict(rows),
        "",
        NOT_MEASURED,
    ]
    return "\n".join(text)


def sharded_verdict(rows) -> str:
    """Whether every sharded row is bitwise its twin's, in a sentence."""
    checked = [r for r in rows if r.get("sharded")]
    differing = [r for r in checked if r["sharded_difference"] != 0]
    if not differing:
        return (
            f"All {len(checked)} rows are bitwise equal, values and gradients: on one device the "
            "sharded losses are their single-device twins, and the errors above are theirs."
        )
    largest = max(r["sharded_difference"] for r in differing)
    return (
        f"{len(differing)} of {len(checked)} rows differ, by at most {largest:.1e} in any "
        "value or gradient; the errors of both are in the table."
    )


def beyond_bounds(rows) -> str:
    """Sentences on ours' bf16 and float16 errors beyond ``u`` (values, the logits' gradients)
    or ``2u`` (the fused losses' gradients): those at logits drifted to 1e3 and more (float32's
    products), and the others (float16's subnormal range), or that there are none."""
    unit = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
    drifted, small = [], []
    for row in (r for r in rows if r["dtype"] in unit):
        fused = BY_NAME[row["loss"]].family == "linear"
        for quantity, e in row["errors"]["ours"].items():
            bound = unit[row["dtype"]] * (2 if fused and quantity.startswith("d ") else 1)
            if not excluded(row, quantity) and error_of(e) > bound:
                (drifted if row["scale"] >= 1e3 else small).append(
                    f"`{row['loss']}` {quantity} in {row['dtype']}, {row['regime']} "
                    f"{row['scale']:g}, V {row['V']:,}: {cell(error_of(e))}"
                )
    if not drifted and not small:
        return "No bf16 or float16 error of ours exceeds these bounds."
    text = []
    if drifted:
        text.append(
            f"Beyond them, at logits drifted to 1e3 and more, the same float32 products: "
            f"{'; '.join(drifted)}."
        )
    if small:
        text.append(
            f"And in float16's subnormal range: {'; '.join(small)}. A mean over N tokens gives "
            "each class a gradient of about `1 / (N V)`: at V = 256,000 the classifier's "
            "gradient is at most 1.5e-4, next to float16's smallest normal number (6.1e-5), "
            "below which float16 keeps 3e-8 absolute instead of `u` relative. Loss scaling, "
            "float16 training's usual remedy (a cotangent of 1,024), brings it to 6.1e-4, within "
            "`2u`."
        )
    return " ".join(text)


def findings(rows) -> list[str]:
    """The summary at the top of the page, its numbers from the rows."""

    def worst(loss, dtype, implementation, kind):
        mine = [r for r in rows if r["loss"] == loss and r["dtype"] == dtype]
        found = worst_of(mine, implementation, kind)
        return "-" if found is None else cell(found[0]).replace("**", "")

    drop_in = "softmax_cross_entropy_with_integer_labels"
    pairs = lambda loss, kind, dtypes=DTYPES: ", ".join(
        f"{worst(loss, d, 'ours', kind)} against {worst(loss, d, 'optax', kind)} in {d}"
        for d in dtypes
    )  # fmt: skip
    return [
        "* **Every loss is as exact as its dtype.** Each value is within the dtype's unit "
        "roundoff `u` of the exact value of the same rounded inputs (bf16 `u` = 3.9e-3, "
        "float16 4.9e-4), and each gradient within `u` of its size (`2u` for the fused "
        "losses, whose logits' gradient is rounded to the inputs' dtype before the products, "
        "as the naive composition's is): everything is computed in float32 and rounded once. "
        "In float32 the errors are a few `u32` (6.0e-8), but for the fused losses at logits "
        "drifted to 1e3 and more: there the float32 products `h W^T` themselves, ours and "
        "anyone's, are off by `u32 |h| |W|` (at 1e4: "
        f"{worst('linear_cross_entropy', 'float32', 'ours', 'value')} of the loss, "
        f"{worst('linear_distillation_loss', 'float32', 'ours', 'gradient')} of a teacher's "
        "gradient, where `log q - log p` cancels; the naive composition's "
        f"{worst('linear_distillation_loss', 'float32', 'naive', 'gradient')}). "
        + beyond_bounds(rows),
        f"* **The optax drop-in against optax** (`{drop_in}`, worst over the grid), the loss: "
        f"{pairs(drop_in, 'value')}; the gradient: {pairs(drop_in, 'gradient')}. optax "
        f"subtracts the label's logit from `logsumexp(z)` rounded to the logits' dtype, which "
        f"at logits drifted to magnitude `s` loses `u s` nats: at `s` = 1e4 in bf16, the whole "
        f"loss. We keep `max z` and `log sum exp(z - max)` apart, so the loss is `log sum - "
        f"(z_y - max)` with both terms exact to float32. Its gradient, the autodiff of "
        f"`logsumexp` in the dtype, rounds two or three times where ours rounds once.",
        f"* **The fused losses never round the logits to bf16.** `linear_cross_entropy` against "
        f"optax's loss of `h @ W.T`: the loss {pairs('linear_cross_entropy', 'value')}; the "
        f"gradients {pairs('linear_cross_entropy', 'gradient')}. Each tile of logits is summed "
        f"in float32 from the exact products of bf16 numbers; `h @ W.T` in bf16 rounds every "
        f"logit (by up to 4 at 1,000), and a probability of a logit off by 4 is off by a factor "
        f"of up to `e^4`.",
        "* **float16 overflows in three places; ours in none that the result can hold.** "
        "(1) A row's loss beyond 65,504 nats is inf in float16, correctly rounded, in any "
        "per-example output (in this grid only `softmax_cross_entropy`'s gradient with respect "
        "to the labels, `-log softmax`, gets there; the tests build rows of 80,000 nats): "
        "`cross_entropy`'s mean is reduced in float32 and stays finite and within `u`, where "
        "optax's mean of its rows is inf. (2) `sum exp(z - max)` beyond 65,504, when more than "
        "65,504 classes sit at the maximum: `h @ W.T` in float16 at V = 256,000 and logits "
        "drifted to 1e4 rounds a whole row to 10,000. JAX's `logsumexp` and `log_softmax` sum "
        "in float32 but round the sum to float16, so optax's loss and the naive one are inf; "
        "ours keeps the sum in float32. (3) `log_softmax` of float16 logits spread to 1e4 "
        "computes `z - max` in float16, which overflows to `-inf`; the naive entropy is then "
        "NaN. Ours computes `z - max` in float32.",
        f"* **optax's distillation gives the teacher NaN gradients.** `optax.kl_divergence("
        f"log_softmax(z_s), softmax(z_t))` differentiates `log(q)` where the teacher's softmax "
        f"underflows to 0 (logits spread to 100 in float32 already): NaN in "
        f"{', '.join(d for d in DTYPES if worst('distillation_loss', d, 'optax', 'gradient') == 'inf')}. "
        f"The derived rule's `q (log q - log p - KL)` is finite and within `u`: "
        f"{', '.join(worst('distillation_loss', d, 'ours', 'gradient') + ' in ' + d for d in DTYPES)}.",
        f"* **Log-probabilities are float32 whatever the logits.** `token_log_probs` and "
        f"`linear_token_log_probs` return float32: from bf16 or float16 logits, log-probabilities "
        f"within {worst('token_log_probs', 'bfloat16', 'ours', 'value')} (bf16) of the exact "
        f"ones, where `log_softmax` in bf16 is off by "
        f"{worst('token_log_probs', 'bfloat16', 'naive', 'value')} and in float16 overflows "
        f"({worst('token_log_probs', 'float16', 'naive', 'value')}). The entropy's gradient (an "
        "entropy bonus's) is `-p (log p + H)`, small and cancelling where the policy is "
        "confident: the autodiff of `log_softmax` loses it there (worst "
        f"{worst('token_log_probs', 'float32', 'naive', 'gradient')} in float32, "
        f"{worst('token_log_probs', 'bfloat16', 'naive', 'gradient')} in bf16, at V of "
        "32,000 and more), the derived rule keeps it within `u` "
        f"({worst('token_log_probs', 'float32', 'ours', 'gradient')} and "
        f"{worst('token_log_probs', 'bfloat16', 'ours', 'gradient')}).",
        "",
        "**Where to pass float32.** The gradients need no float32: they are exact to the "
        "dtype they are returned in. Pass float32 (or read a float32 result) where the *value* "
        "must be finer than the dtype holds, or larger:",
        "",
        "* a loss to more than bf16's 2 to 3 digits (evaluation, perplexity, comparing runs): "
        "the reduced losses return the logits' (or `hidden`'s) dtype. "
        "`-jaxsoftmax.token_log_probs(logits, labels)` is each token's loss in float32 from "
        "bf16 logits, without a float32 copy of the logits "
        "(`-linear_token_log_probs(h, W, labels)` from the hidden states); or cast the logits "
        "to float32 (in the logits path, one more `[N, V]` array);",
        "* float16 logits whose rows' losses, or `-log softmax`, can exceed 65,504 (logits "
        "spread beyond about 3e4): use a reduced loss (its mean is float32 inside) or float32 "
        "logits;",
        "* logits that drift far from 0 (magnitude 1e3 and more): bf16 then cannot hold the "
        "logits themselves (its spacing is 8 at 1,000, 64 at 10,000, so every logit within 4 "
        "of the maximum rounds to it). That rounding is the model's, before any loss, and "
        "none of the errors here counts it. float32 logits, or z-loss keeping them near 0, "
        "are the cure; even float32 products of the fused losses lose `u32 |h| |W|` there.",
        "",
    ]


TESTS = """\
tests/test_numerics.py keeps these cases at the smallest shapes that show them (7 tests,
about 6 s on the 2-core CPU), each against float64 from the rounded inputs and with a bound
derived from the dtype's unit roundoff `u` and float32's `u32` (the module docstring gives the
reasoning: one rounding to the dtype, `u`; float32's sum over `V` classes, at most `V u32`,
taken as `8 V u32`; the fused loss's gradients `2u`):

* `test_drifted_logits_lose_nothing_to_the_logsumexp` (bf16 and float16): logits `1000 +
  4 N(0, 1)`, labels from their softmax; the drop-in's rows, `cross_entropy`'s mean and the
  gradient within `u`; optax's rows at least 20 times worse (390 and 560 times here).
* `test_float16_mean_loss_beyond_float16s_range`: rows with a loss of 80,000; the float16
  rows are inf exactly where the exact loss exceeds 65,504, the mean and its gradient are
  within `u`; optax's mean and `log_softmax` overflow.
* `test_float16_sum_of_exponentials_beyond_float16s_range`: 70,000 near-equal float16
  logits; ours within `u`, optax's loss inf.
* `test_bf16_teacher_gradient_where_its_softmax_underflows`: teacher and student logits
  spread to 100 in bf16; the loss and both gradients within `u`; optax's teacher gradient
  not finite.
* `test_bf16_log_probs_exact_to_float32`: `token_log_probs` of bf16 logits within `8 V u32`
  (float32's rounding), log-probabilities and entropy; the entropy's gradient within `u`.
* `test_fused_loss_of_drifted_bf16_logits`: `linear_cross_entropy` at logits drifted to
  1,000 in bf16; the loss within `u`, the gradients within `2u`; optax's loss of `h @ W.T`
  over 20 times worse, its gradients over 10 times.
"""

NOT_MEASURED = """\
## Not measured here

* **PyTorch.** Not installed in this environment, whose package index serves only its CUDA
  build (a 554 MB wheel that needs the CUDA libraries besides).
* **The options.** z-loss, label smoothing, the logit soft cap, class weights, masks,
  temperatures other than 1, the reverse KL and JSD divergences, hard labels in distillation
  and `gradient_filter` (an approximation, measured in
  [linear-cross-entropy.md](linear-cross-entropy.md)): each
  changes `q` or adds a term computed in the same float32, but none is in this grid.
* **Other backends.** XLA:CPU only. GPUs and TPUs sum in other orders (float32 errors of
  the same size); a TPU multiplies float32 matrices in bf16 passes at the default matmul
  precision, which the fused losses' products then inherit
  ([linear-cross-entropy.md](linear-cross-entropy.md)).
"""


def main(argv=None):
    parser = harness.benchmark_parser(
        __doc__,
        out=f"output folder of results.json and results.md; None: benchmarks/results/cpu/"
        f"numerics (and docs/numerics.md), or {QUICK_OUT} with --quick (which writes no doc)",
        repeats=None,
    )
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="compute nothing: write results.md and docs/numerics.md again from OUT/results.json",
    )
    common.add_cache_flag(parser)
    args = common.parse_flags(parser, argv)
    out = os.path.relpath(
        harness.output_folder(args, QUICK_OUT, jax.devices()[0].platform, "numerics")
    )
    if args.from_results:
        with open(os.path.join(out, "results.json")) as file:
            saved = json.load(file)
        return write_outputs(args, out, saved["meta"], saved["rows"], wrote_json=False)
    grid = QUICK if args.quick else dict(vocabularies=VOCABULARIES, scales=SCALES, dtypes=DTYPES)
    cases = []
    for loss in LOSSES:
        for dtype in grid["dtypes"]:
            for v, n in grid["vocabularies"].items():
                cases.append((f"{loss.name} {dtype} {v}", lambda loss=loss, d=dtype, v=v, n=n: (
                    case_rows(loss, d, v, n, grid["scales"]))))  # fmt: skip
    mesh = jax.make_mesh((1,), ("model",))
    sharded_v = min(grid["vocabularies"], key=lambda v: abs(v - SHARDED_VOCABULARY))
    for sharded_name, (name, fn) in sharded_losses(mesh).items():
        for dtype in grid["dtypes"]:
            cases.append((f"{sharded_name} {dtype} {sharded_v}", lambda name=name, d=dtype, fn=fn: (
                case_rows(BY_NAME[name], d, sharded_v, grid["vocabularies"][sharded_v],
                          grid["scales"], sharded=fn))))  # fmt: skip
    settings = dict(grid={k: str(v) for k, v in grid.items()}, width=WIDTH)
    rows = harness.run_cases(out, settings, cases, fresh=args.fresh)
    device = jax.devices()[0]
    meta = dict(
        device=harness.device_model(device),
        command=harness.command("numerics.py", argv),
        jax=jax.__version__,
        optax=optax.__version__,
        jaxsoftmax=jaxsoftmax.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        quick=args.quick,
        grid={k: (list(v) if not isinstance(v, dict) else v) for k, v in grid.items()},
        width=WIDTH,
        errors={
            "value": "[max |x - x64| / max(|x64|, 1)] over the rows",
            "gradient": "[max |g - g64| / max size, max |g - g64| / max |g64|, "
            "||g - g64||_2 / ||g64||_2], size: the sum of the absolute terms of g64",
            "overflow": "quantities with an exact entry beyond the dtype's largest number",
            "underflow": "gradients whose every term is below the dtype's smallest normal",
            "sharded_difference": "largest |sharded - single-device| of any value or gradient",
        },
    )
    lines = ",\n".join(json.dumps(row) for row in rows)  # one row a line: diffs stay readable
    text = f'{{"meta": {json.dumps(meta, indent=1)},\n"rows": [\n{lines}\n]}}\n'
    training.write_atomically(os.path.join(out, "results.json"), text)
    os.remove(os.path.join(out, harness.PARTIAL_RESULTS))
    return write_outputs(args, out, meta, rows)


def write_outputs(args, out: str, meta, rows, wrote_json: bool = True) -> list[dict]:
    """results.md, and docs/numerics.md for the committed results (not --quick, no --out)."""
    write_markdown(os.path.join(out, "results.md"), meta, rows)
    written = [f"{out}/results.json"] * wrote_json + [f"{out}/results.md"]
    if not args.quick and args.out is None:
        training.write_atomically(os.path.join(ROOT, "docs", "numerics.md"), render(meta, rows))
        written.append("docs/numerics.md")
    print("wrote " + ", ".join(written))
    return rows


if __name__ == "__main__":
    main()

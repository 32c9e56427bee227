"""The derived rule itself: properties, that it is really used, what it keeps, its numerics."""

import functools
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import sample
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsoftmax import cross_entropy, softmax_cross_entropy
from jaxsoftmax import softmax_cross_entropy_with_integer_labels as integer_loss
from jaxsoftmax.core import row_terms, rule

# This module empties JAX's caches (plain_path_only, jax.clear_caches, the benchmark's cold
# runs), after which every test of the same worker compiles its programs again: its tests run
# together on one worker (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("empties_jax_caches")

FINITE = st.floats(-30.0, 30.0, allow_nan=False, width=32)


@st.composite
def row_problems(draw, max_rows=8, max_classes=6):
    """Logits and labels, and what the row properties transform them with: a constant per row,
    a permutation of the classes and two label smoothings."""
    rows = draw(st.integers(1, max_rows))
    classes = draw(st.integers(2, max_classes))
    logits = draw(hnp.arrays(np.float32, (rows, classes), elements=FINITE))
    labels = draw(hnp.arrays(np.int32, (rows,), elements=st.integers(0, classes - 1)))
    shifts = draw(hnp.arrays(np.float32, (rows, 1), elements=st.floats(-50.0, 50.0, width=32)))
    permutation = np.array(draw(st.permutations(range(classes))))
    smoothings = tuple(draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=2, max_size=2)))
    return logits, labels, shifts, permutation, smoothings


def value_and_grad_sum(logits, labels):
    return jax.value_and_grad(lambda z: cross_entropy(z, labels, reduction="sum"))(logits)


def normalized_target_gradients(logits, labels, smoothings):
    """The gradients for integer labels smoothed by each of ``smoothings``, and for
    probability targets (a softmax of the rows in reverse order)."""
    smoothed = [
        jax.grad(lambda z, s=s: cross_entropy(z, labels, label_smoothing=s))(logits)
        for s in smoothings
    ]
    probs = jax.nn.softmax(logits[::-1])
    return smoothed, jax.grad(lambda z: jnp.sum(softmax_cross_entropy(z, probs)))(logits)


# Every row property of an example in one program (the smoothings are static: each example
# compiles one anyway). Run eagerly, each example compiled the gradient's operations one by one.
@functools.partial(jax.jit, static_argnames="smoothings")
def row_properties(logits, labels, shifted, permuted, permuted_labels, smoothings):
    return {
        "plain": value_and_grad_sum(logits, labels),
        "shifted": value_and_grad_sum(shifted, labels),
        "permuted": value_and_grad_sum(permuted, permuted_labels),
        "per_row": cross_entropy(logits, labels, reduction="none"),
        "normalized": normalized_target_gradients(logits, labels, smoothings),
    }


# Each example holds up to 8 rows, a constant for each and two smoothings: 15 examples
# (one program each) draw more rows and smoothings than 25 examples of 4 rows did per property.
@settings(max_examples=15, deadline=None)
@given(row_problems())
def test_row_properties(problem):
    """Invariance to adding a constant to a row, gradient rows summing to zero for normalized
    targets (smoothed labels, probabilities), equivariance under permuting the classes, and
    the per-row values against the float64 reference: each property on its own."""
    logits, labels, shifts, permutation, smoothings = problem
    inverse = np.argsort(permutation)
    permuted_labels = inverse[labels].astype(np.int32)
    got = jax.device_get(
        row_properties(
            logits,
            labels,
            logits + shifts,
            logits[:, permutation],
            permuted_labels,
            smoothings=tuple(float(s) for s in smoothings),
        )
    )
    (value, grad), (value_s, grad_s) = got["plain"], got["shifted"]
    # adding a constant to each row
    np.testing.assert_allclose(value_s, value, rtol=1e-4, atol=1e-3, err_msg="shifted value")
    np.testing.assert_allclose(grad_s, grad, rtol=1e-3, atol=1e-4, err_msg="shifted gradient")
    # normalized targets: each gradient row sums to zero
    smoothed, probabilities = got["normalized"]
    for smoothing, gradient in zip(smoothings, smoothed):
        np.testing.assert_allclose(
            np.sum(gradient, axis=-1), 0.0, atol=1e-6, err_msg=f"smoothed {smoothing}"
        )
    np.testing.assert_allclose(
        np.sum(probabilities, axis=-1), 0.0, atol=1e-5, err_msg="probability targets"
    )
    # permuting the classes
    value_p, grad_p = got["permuted"]
    np.testing.assert_allclose(value_p, value, rtol=1e-5, atol=1e-5, err_msg="permuted value")
    np.testing.assert_allclose(
        grad_p, np.asarray(grad)[:, permutation], rtol=1e-5, atol=1e-6, err_msg="permuted grad"
    )
    # the float64 reference
    np.testing.assert_allclose(
        got["per_row"],
        reference.cross_entropy(logits, labels, reduction="none"),
        rtol=1e-5,
        atol=1e-5,
        err_msg="against the float64 reference",
    )


@pytest.fixture
def patch_rule(monkeypatch):
    """Replaces functions of ``row_terms`` for one test; no trace made with them outlives it."""

    def patch(name, replacement):
        monkeypatch.setattr(row_terms, name, replacement)
        jax.clear_caches()  # a cached trace would not call the rule's Python again

    yield patch
    monkeypatch.undo()
    jax.clear_caches()


def count_rule_calls(patch_rule):
    """Counts calls of the rule's two gradient functions (logits and probability labels)."""
    calls = {"gradient_expression": 0, "probabilities_gradient": 0}
    for name in calls:
        original = getattr(row_terms, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        patch_rule(name, counting)
    return calls


def rule_problem(kind):
    logits = sample.normal(0, (7, 5))
    if kind == "labels":
        return logits, np.arange(7, dtype=np.int32) % 5
    return logits, sample.probabilities(1, (7, 5))


def with_options(z, y):
    return cross_entropy(z, y, label_smoothing=0.1, z_loss=1e-3, logit_softcap=3.0)


RULE_CASES = {
    "cross_entropy": (with_options, "labels"),
    "cross_entropy_probabilities": (with_options, "probabilities"),
    "integer_dropin": (lambda z, y: jnp.sum(integer_loss(z, y)), "labels"),
    "probability_dropin": (lambda z, y: jnp.sum(softmax_cross_entropy(z, y)), "probabilities"),
}


@pytest.mark.parametrize("case", RULE_CASES)
def test_gradient_runs_through_the_derived_rule(patch_rule, case):
    """Fails if a gradient came from autodiff of the forward instead of the rule."""
    loss, kind = RULE_CASES[case]
    logits, targets = rule_problem(kind)
    calls = count_rule_calls(patch_rule)
    jax.block_until_ready(loss(logits, targets))
    assert calls == {"gradient_expression": 0, "probabilities_gradient": 0}, "forward only"
    # Traced, not compiled: the rule's Python runs when the gradient is traced.
    jax.make_jaxpr(jax.grad(loss))(logits, targets)
    assert calls["gradient_expression"] >= 1, "jax.grad bypassed the custom rule"
    if kind == "probabilities":
        calls.update(gradient_expression=0, probabilities_gradient=0)
        jax.clear_caches()
        jax.make_jaxpr(jax.grad(loss, argnums=1))(logits, targets)
        assert calls["probabilities_gradient"] >= 1, "the label gradient bypassed the rule"


def test_jaxpr_contains_the_custom_vjp_call():
    logits = np.zeros((3, 4), np.float32)
    labels = np.array([0, 1, 2], np.int32)
    jaxpr = jax.make_jaxpr(lambda z: cross_entropy(z, labels))(logits)
    assert "custom_vjp_call" in str(jaxpr)
    jaxpr = jax.make_jaxpr(lambda z: integer_loss(z, labels))(logits)
    assert "custom_jvp_call" in str(jaxpr)
    probabilities = np.full((3, 4), 0.25, np.float32)
    jaxpr = jax.make_jaxpr(lambda z: softmax_cross_entropy(z, probabilities))(logits)
    assert "custom_jvp_call" in str(jaxpr)


def test_a_wrong_rule_would_be_caught(patch_rule):
    """Sanity check of the test design: sabotaging one of the rule's gradient functions
    changes exactly the gradient it computes. Every case of RULE_CASES in one program: the
    patches act while it is traced."""
    problems = {kind: rule_problem(kind) for kind in ("labels", "probabilities")}
    argnums = {"labels": (0,), "probabilities": (0, 1)}
    names = ["gradient_expression", "probabilities_gradient"]

    def good_and_sabotaged(problems):
        results = {}
        for case, (loss, kind) in RULE_CASES.items():
            grad = jax.grad(loss, argnums[kind])
            results[case, "good"] = grad(*problems[kind])
            for name in names[: len(argnums[kind])]:
                original = getattr(row_terms, name)
                patch_rule(name, lambda *a, _original=original, **k: 2 * _original(*a, **k))
                results[case, name] = grad(*problems[kind])
                patch_rule(name, original)
        return results

    results = jax.jit(good_and_sabotaged)(problems)
    for case, (_, kind) in RULE_CASES.items():
        good = results[case, "good"]
        for sabotaged, name in enumerate(names[: len(argnums[kind])]):
            bad = results[case, name]
            for argnum in range(len(argnums[kind])):
                changed = not np.allclose(good[argnum], bad[argnum])
                assert changed == (argnum == sabotaged), (case, name, argnum)


def residual_arrays(fn, logits):
    _, pullback = jax.vjp(fn, logits)
    return [leaf for leaf in jax.tree_util.tree_leaves(pullback) if hasattr(leaf, "shape")]


@pytest.mark.parametrize(
    "loss,logits_sized",
    [
        (
            lambda z: cross_entropy(
                z, np.arange(64, dtype=np.int32) % 1000, label_smoothing=0.1, z_loss=1e-4
            ),
            1,
        ),
        (lambda z: jnp.sum(integer_loss(z, np.arange(64, dtype=np.int32) % 1000)), 1),
        (lambda z: cross_entropy(z, np.full((64, 1000), 1e-3, np.float32), label_smoothing=0.1), 2),
        (lambda z: jnp.sum(softmax_cross_entropy(z, np.full((64, 1000), 1e-3, np.float32))), 2),
    ],
    ids=["cross_entropy", "integer_dropin", "cross_entropy_probabilities", "probability_dropin"],
)
def test_residuals_are_the_logits_and_per_row_statistics(loss, logits_sized):
    """Integer labels keep one logits-sized residual (the logits); probability targets may
    add a second one, the targets themselves, and nothing else."""
    logits = sample.normal(2, (64, 1000))
    leaves = residual_arrays(loss, logits)
    big = [leaf for leaf in leaves if leaf.size >= logits.size]
    assert sum(leaf.size for leaf in big) <= logits_sized * logits.size, [l.shape for l in big]
    assert all(leaf.size <= logits.size for leaf in leaves)
    small = sum(leaf.size for leaf in leaves if leaf.size < logits.size)
    assert small <= 8 * 64 + 1000, f"unexpected residuals {[l.shape for l in leaves]}"


def test_compiled_gradient_uses_less_temporary_memory_than_autodiff_of_naive():
    logits = jax.ShapeDtypeStruct((256, 4096), jnp.float32)
    labels = jax.ShapeDtypeStruct((256,), jnp.int32)

    def naive(z, y):
        return -jnp.mean(jnp.sum(jax.nn.one_hot(y, 4096) * jnp.log(jax.nn.softmax(z)), -1))

    def temp_bytes(fn):
        compiled = jax.jit(jax.grad(fn)).lower(logits, labels).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours, theirs = temp_bytes(cross_entropy), temp_bytes(naive)
    assert ours < theirs, (ours, theirs)
    assert ours <= 256 * 4096 * 4 // 2, f"{ours} temporary bytes for a {256 * 4096 * 4} B gradient"


# Numerics ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_computed_in_float32_and_keeps_its_dtype(dtype):
    logits = sample.normal(3, (32, 50), dtype, scale=4.0)
    labels = np.arange(32, dtype=np.int32) % 50
    upcast = np.asarray(logits, np.float32)
    both = lambda z, z32: [jax.value_and_grad(cross_entropy)(x, labels) for x in (z, z32)]
    (value, grad), (value32, grad32) = jax.jit(both)(logits, upcast)  # one program
    assert value.dtype == dtype and grad.dtype == dtype
    # Rounding only at the end: within one half-precision ulp of the f32 computation.
    np.testing.assert_allclose(np.float32(value), value32, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(grad, np.float32), grad32, rtol=1e-2, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(jax.grad(cross_entropy))(logits, labels))
    assert "reduce_sum" in jaxpr and "f32[32,50]" in jaxpr


def one_hot(labels, num_classes):
    return np.eye(num_classes, dtype=np.float32)[labels]


def smoothed(labels, num_classes, eps=0.1):
    return ((1 - eps) * one_hot(labels, num_classes) + eps / num_classes).astype(np.float32)


# (per-row loss, kind of targets it takes) for every public loss.
PER_ROW_LOSSES = {
    "cross_entropy": lambda z, t: cross_entropy(z, t, reduction="none"),
    "integer_dropin": integer_loss,
    "probability_dropin": softmax_cross_entropy,
}
EXTREME_CASES = [
    ("cross_entropy", "labels"),
    ("cross_entropy", "one_hot"),
    ("cross_entropy", "distribution"),
    ("integer_dropin", "labels"),
    ("probability_dropin", "one_hot"),
    ("probability_dropin", "distribution"),
]


def extreme_targets(kind, labels, distribution):
    """Integer labels, or as probabilities: their one-hot or another distribution."""
    num_classes = distribution.shape[-1]
    targets = {"labels": labels, "one_hot": one_hot(labels, num_classes)}
    targets["distribution"] = distribution
    y = targets["one_hot"] if kind == "labels" else targets[kind]
    return jnp.asarray(targets[kind]), y


HUGE_LOGITS = np.array([[1e30, -1e30, 0.0], [1e30, 1e30, -1e30], [-1e30, 5.0, 1e30]], np.float32)
HUGE_LABELS = np.array([0, 1, 1])


@functools.cache
def huge_logits_results():
    """Every case of EXTREME_CASES on HUGE_LOGITS, and the naive loss for each kind of
    target: one program, shared by the cases' tests."""
    every_targets = {
        c: extreme_targets(c[1], HUGE_LABELS, smoothed(HUGE_LABELS, 3)) for c in EXTREME_CASES
    }

    def every(z, targets):
        results = {}
        for (loss, kind), t in targets.items():
            f = PER_ROW_LOSSES[loss]
            per, grad = jax.vmap(jax.value_and_grad(f))(z, t)
            whole_grad = jax.grad(lambda z: jnp.sum(f(z, t)))(z)
            y = every_targets[loss, kind][1]
            naive = lambda z: -jnp.sum(y * jnp.log(jax.nn.softmax(z)), -1)
            naive_grad = jax.grad(lambda z: jnp.sum(naive(z)))(z)
            results[loss, kind] = per, grad, whole_grad, naive(z), naive_grad
        return results

    targets = {case: np.asarray(t) for case, (t, _) in every_targets.items()}
    return jax.device_get(jax.jit(every)(HUGE_LOGITS, targets))


@pytest.mark.parametrize("loss,kind", EXTREME_CASES, ids=["-".join(c) for c in EXTREME_CASES])
def test_huge_logits_are_finite_and_exact_where_naive_fails(loss, kind):
    logits, labels = HUGE_LOGITS, HUGE_LABELS
    _, y = extreme_targets(kind, labels, smoothed(labels, 3))
    per, grad, whole_grad, naive_value, naive_grad = huge_logits_results()[loss, kind]
    expected, expected_grad = reference.loss_and_gradient(logits, y)
    if kind != "distribution":  # the reference itself, against the values by hand
        big = np.float64(np.float32(1e30))
        np.testing.assert_allclose(expected, [0.0, np.log(2.0), big - 5.0], rtol=1e-15)
    np.testing.assert_allclose(per, expected, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(whole_grad, grad)
    assert not np.all(np.isfinite(naive_value)) or not np.allclose(naive_value, expected)
    assert not np.all(np.isfinite(naive_grad))


MINUS_INF_LOGITS = np.array([[0.0, -np.inf, 1.0, -np.inf], [2.0, 0.5, -np.inf, -1.0]], np.float32)
MINUS_INF_LABELS = np.array([2, 0])
MINUS_INF_DISTRIBUTION = np.array([[0.5, 0.0, 0.5, 0.0], [0.2, 0.8, 0.0, 0.0]], np.float32)


@functools.cache
def minus_inf_results():
    """Every case of EXTREME_CASES on MINUS_INF_LOGITS: per-row losses, the gradient and (for
    cross_entropy) the mean, in one program shared by the cases' tests."""

    def every(z, targets):
        results = {}
        for (loss, kind), t in targets.items():
            f = PER_ROW_LOSSES[loss]
            grad = jax.grad(lambda z: jnp.sum(f(z, t)))(z)
            mean = cross_entropy(z, t) if loss == "cross_entropy" else None
            results[loss, kind] = f(z, t), grad, mean
        return results

    targets = {
        (loss, kind): np.asarray(extreme_targets(kind, MINUS_INF_LABELS, MINUS_INF_DISTRIBUTION)[0])
        for loss, kind in EXTREME_CASES
    }
    return jax.device_get(jax.jit(every)(MINUS_INF_LOGITS, targets))


@pytest.mark.parametrize("loss,kind", EXTREME_CASES, ids=["-".join(c) for c in EXTREME_CASES])
def test_minus_inf_logits_on_classes_without_target_mass_are_finite(loss, kind):
    logits = MINUS_INF_LOGITS
    targets, y = extreme_targets(kind, MINUS_INF_LABELS, MINUS_INF_DISTRIBUTION)
    per, grad, value = minus_inf_results()[loss, kind]
    assert np.all(np.isfinite(per)) and np.all(np.isfinite(grad))
    expected, expected_grad = reference.loss_and_gradient(logits, y)
    np.testing.assert_allclose(per, expected, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)
    assert grad[0, 1] == 0.0 and grad[0, 3] == 0.0 and grad[1, 2] == 0.0
    if loss == "cross_entropy":  # the mean, against PyTorch's semantics in float64
        np.testing.assert_allclose(value, reference.cross_entropy(logits, targets), rtol=1e-6)


@pytest.mark.parametrize("kind", ["labels", "one_hot"])
def test_z_loss_at_huge_logits_gives_an_infinite_loss_and_a_finite_gradient(kind):
    """docs/derivation.md, Numerics: beta * lse^2 overflows float32 where its true value
    does (past |lse| ~ 1.8e21 for beta = 1e-4), so the loss is inf at 1e30; the gradient,
    linear in lse, stays finite and exact."""
    beta = 1e-4
    logits = np.array([[1e30, -1e30, 0.0], [1e30, 1e30, -1e30], [-1e30, 5.0, 1e30]], np.float32)
    labels = np.array([0, 1, 1])
    targets, y = extreme_targets(kind, labels, one_hot(labels, 3))
    f = lambda z, targets: cross_entropy(z, targets, z_loss=beta, reduction="none")
    near = np.array([[1e19, 0.0, -1.0], [2e19, 0.0, -1.0], [3e21, 0.0, -1.0]], np.float32)
    near_labels = np.array([0, 0, 0])
    near_targets, _ = extreme_targets(kind, near_labels, one_hot(near_labels, 3))

    def float32_results(logits, targets, near, near_targets):  # one program
        return (
            f(logits, targets),
            cross_entropy(logits, targets, z_loss=beta),
            jax.grad(lambda z: jnp.sum(f(z, targets)))(logits),
            f(near, near_targets),
        )

    per, mean, grad, values = jax.device_get(
        jax.jit(float32_results)(logits, targets, near, near_targets)
    )
    assert np.all(per == np.inf) and mean == np.inf
    assert np.all(np.isfinite(grad))
    # float64: d/dz [ce + beta lse^2] = softmax (1 + 2 beta lse) - y, with lse = max z here.
    _, ce_grad = reference.loss_and_gradient(logits, y)
    softmax = ce_grad + y
    lse = np.max(logits.astype(np.float64), axis=-1, keepdims=True)
    expected = softmax * (1 + 2 * beta * lse) - y
    big = np.float64(np.float32(1e30))
    np.testing.assert_allclose(expected[2], [0.0, -1.0, 2 * beta * big], rtol=1e-15)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)
    # The threshold is beta * lse^2 itself, not lse^2: 4e34 at lse = 2e19 fits in float32
    # (lse^2 = 4e38 would not), 9e38 at lse = 3e21 does not.
    expected_near = beta * near[:2, 0].astype(np.float64) ** 2
    np.testing.assert_allclose(values[:2], expected_near, rtol=1e-6)
    assert values[2] == np.inf
    with jax.enable_x64(True):  # float64 holds beta * lse^2 ~ 1e56
        wide = cross_entropy(np.asarray(logits, np.float64), targets, z_loss=beta, reduction="none")
        np.testing.assert_allclose(wide, beta * lse[:, 0] ** 2, rtol=1e-12)


def test_label_smoothing_on_a_minus_inf_class_is_infinite_as_the_math_says():
    logits = np.array([[0.0, -np.inf, 1.0]], np.float32)
    value = cross_entropy(logits, np.array([0], np.int32), label_smoothing=0.1)
    assert float(value) == np.inf


def test_compute_dtype():
    assert row_terms.compute_dtype(jnp.bfloat16) == jnp.float32
    assert row_terms.compute_dtype(jnp.float16) == jnp.float32
    assert row_terms.compute_dtype(jnp.float32) == jnp.float32
    assert row_terms.compute_dtype(np.float64) == np.float64


def test_rule_options_are_static_and_hashable():
    options = row_terms.RuleOptions(label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0)
    assert hash(options) == hash(row_terms.RuleOptions(0.1, 1e-4, 30.0))
    f = functools.partial(rule.softmax_cross_entropy_rows, options=options)
    out = jax.jit(f)(np.zeros((2, 3), np.float32), np.array([0, 1], np.int32), None, None, None)
    np.testing.assert_allclose(out, [np.log(3.0) + 1e-4 * np.log(3.0) ** 2] * 2, rtol=1e-6)


def test_compiled_loss_and_gradient_compute_one_exponential_per_logit():
    """Forward and backward compiled together (``value_and_grad`` under ``jit``) compute
    ``exp(z - m)`` once per logit: the backward writes the softmax as the forward's own
    exponential times ``exp(-log_sum)``, so XLA merges the two, writes it where the gradient
    goes, sums it there and finishes the gradient in place (its label entries by a scatter, in
    place too), as autodiff of optax's loss does. A backward with an exponential of its own
    costs a second one per logit (a third of the call at [1024, 1000] on the CPU); one that
    shares ``z - m`` or a broadcast with the forward makes XLA write that out as well, and a
    scatter that is not in place needs a second logits-sized buffer. Compiled for the CPU,
    whose fusion decisions this pins."""
    cpu = jax.sharding.make_single_device_sharding(jax.devices("cpu")[0])
    logits = jax.ShapeDtypeStruct((256, 1000), jnp.float32, sharding=cpu)
    labels = jax.ShapeDtypeStruct((256,), jnp.int32, sharding=cpu)
    compiled = jax.jit(jax.value_and_grad(cross_entropy)).lower(logits, labels).compile()
    hlo = compiled.as_text()
    entry = hlo[hlo.index("\nENTRY") :]

    def body(name):  # the instructions of a computation the entry calls
        start = hlo.index(f"\n{name} ") + 1
        return hlo[start : hlo.index("\n}", start)]

    called = re.findall(r"calls=(%[\w.\-]+)", entry)
    exponentials = [name for name in called if "f32[256,1000]{1,0} exponential(" in body(name)]
    assert len(exponentials) == 1, exponentials
    written = [
        line
        for line in entry.splitlines()
        if " = f32[256,1000]" in line and "parameter(" not in line and "scatter" not in line
    ]
    assert len(written) <= 2, "\n".join(written)  # the exponential, the gradient in place
    assert compiled.memory_analysis().temp_size_in_bytes < 256 * 1000 * 4 // 4


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_bf16_logits_are_widened_inside_the_passes_not_copied(label_smoothing):
    """For bf16 logits and integer labels, ``value_and_grad`` under ``jit`` needs no float32
    copy of the logits: the maximum reads them as they are and each pass over the classes
    widens them itself. Gathering the label's logit from the widened array, sharing
    ``z - m`` between the sum of exponentials and the smoothing sum, or letting the forward
    and the backward share one widening, makes XLA's CPU backend write such a copy (``4 N C``
    bytes of temporary memory, twice the logits). Compiled for the CPU, whose fusion decisions
    this pins; there float16 logits, a class mask (``where`` of the logits' shape), a soft cap
    and probability targets still cost a copy, as the CPU's fused reductions do not widen
    float16 or compute select or tanh."""
    cpu = jax.sharding.make_single_device_sharding(jax.devices("cpu")[0])
    rows, classes = 256, 1000
    logits = jax.ShapeDtypeStruct((rows, classes), jnp.bfloat16, sharding=cpu)
    labels = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=cpu)

    def loss(z, y):
        return cross_entropy(z, y, label_smoothing=label_smoothing)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(logits, labels).compile()
    temporary = compiled.memory_analysis().temp_size_in_bytes
    assert temporary < rows * classes * 4 // 4, temporary


def test_bf16_probability_targets_are_widened_once_per_pass():
    """bf16 probability targets: the forward's target sum and the backward each widen the
    targets themselves. Merged into one widening, XLA's CPU backend writes the float32 targets
    out whole, a second float32 array of the logits' size next to the one the target sum's
    select costs (see the test above)."""
    cpu = jax.sharding.make_single_device_sharding(jax.devices("cpu")[0])
    rows, classes = 256, 1000
    logits = jax.ShapeDtypeStruct((rows, classes), jnp.bfloat16, sharding=cpu)
    targets = jax.ShapeDtypeStruct((rows, classes), jnp.bfloat16, sharding=cpu)
    compiled = jax.jit(jax.value_and_grad(cross_entropy)).lower(logits, targets).compile()
    temporary = compiled.memory_analysis().temp_size_in_bytes
    assert temporary < rows * classes * 4 * 5 // 4, temporary


def test_a_class_mask_costs_no_logits_sized_temporary():
    """Float32 logits with ``where`` of the logits' shape: whether a row has any class left is
    an ``any`` over the mask, not a sum of the mask as integers, which XLA's CPU backend writes
    out whole (``4 N C`` bytes) before summing it."""
    cpu = jax.sharding.make_single_device_sharding(jax.devices("cpu")[0])
    rows, classes = 256, 1000
    logits = jax.ShapeDtypeStruct((rows, classes), jnp.float32, sharding=cpu)
    labels = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=cpu)
    where = jax.ShapeDtypeStruct((rows, classes), jnp.bool_, sharding=cpu)

    def loss(z, y, where):
        return cross_entropy(z, y, where=where)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(logits, labels, where).compile()
    temporary = compiled.memory_analysis().temp_size_in_bytes
    assert temporary < rows * classes * 4 // 4, temporary

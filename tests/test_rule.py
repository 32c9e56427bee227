"""The derived rule itself: properties, that it is really used, what it keeps, its numerics."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsoftmax import _rule, cross_entropy, softmax_cross_entropy
from jaxsoftmax import softmax_cross_entropy_with_integer_labels as integer_loss

FINITE = st.floats(-30.0, 30.0, allow_nan=False, width=32)
SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def logits_and_labels(draw, max_rows=4, max_classes=6):
    rows = draw(st.integers(1, max_rows))
    classes = draw(st.integers(2, max_classes))
    logits = draw(hnp.arrays(np.float32, (rows, classes), elements=FINITE))
    labels = draw(hnp.arrays(np.int32, (rows,), elements=st.integers(0, classes - 1)))
    return logits, labels


@jax.jit
def value_and_grad_sum(logits, labels):
    return jax.value_and_grad(lambda z: cross_entropy(z, labels, reduction="sum"))(logits)


@SETTINGS
@given(logits_and_labels(), st.floats(-50.0, 50.0, width=32))
def test_invariant_to_adding_a_constant_to_a_row(problem, shift):
    logits, labels = problem
    value, grad = value_and_grad_sum(logits, labels)
    value_shifted, grad_shifted = value_and_grad_sum(logits + np.float32(shift), labels)
    np.testing.assert_allclose(value_shifted, value, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(grad_shifted, grad, rtol=1e-3, atol=1e-4)


@SETTINGS
@given(logits_and_labels(), st.floats(0.0, 1.0, width=32))
def test_gradient_rows_sum_to_zero_for_normalized_targets(problem, smoothing):
    logits, labels = problem
    grad = jax.grad(lambda z: cross_entropy(z, labels, label_smoothing=float(smoothing)))(logits)
    np.testing.assert_allclose(np.sum(grad, axis=-1), 0.0, atol=1e-6)
    probs = jax.nn.softmax(jnp.asarray(logits[::-1]))
    grad = jax.grad(lambda z: jnp.sum(softmax_cross_entropy(z, probs)))(logits)
    np.testing.assert_allclose(np.sum(grad, axis=-1), 0.0, atol=1e-5)


@SETTINGS
@given(logits_and_labels(), st.randoms(use_true_random=False))
def test_equivariant_under_permuting_classes(problem, rng):
    logits, labels = problem
    permutation = np.arange(logits.shape[-1])
    rng.shuffle(permutation)
    inverse = np.argsort(permutation)
    value, grad = value_and_grad_sum(logits, labels)
    value_p, grad_p = value_and_grad_sum(logits[:, permutation], inverse[labels].astype(np.int32))
    np.testing.assert_allclose(value_p, value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_p, grad[:, permutation], rtol=1e-5, atol=1e-6)


@SETTINGS
@given(logits_and_labels())
def test_values_match_float64_reference(problem):
    logits, labels = problem
    got = cross_entropy(logits, labels, reduction="none")
    np.testing.assert_allclose(
        got, reference.cross_entropy(logits, labels, reduction="none"), rtol=1e-5, atol=1e-5
    )


def count_rule_calls(monkeypatch):
    calls = {"logits_gradient": 0}
    original = _rule._logits_gradient

    def counting(*args, **kwargs):
        calls["logits_gradient"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(_rule, "_logits_gradient", counting)
    jax.clear_caches()  # a cached trace would not call the rule's Python again
    return calls


@pytest.mark.parametrize(
    "loss",
    [
        lambda z, y: cross_entropy(z, y, label_smoothing=0.1, z_loss=1e-3, logit_softcap=3.0),
        lambda z, y: jnp.sum(integer_loss(z, y)),
    ],
    ids=["cross_entropy", "integer_dropin"],
)
def test_gradient_runs_through_the_derived_rule(monkeypatch, loss):
    """Fails if the gradient came from autodiff of the forward instead of the rule."""
    calls = count_rule_calls(monkeypatch)
    logits = jax.random.normal(jax.random.PRNGKey(0), (7, 5))
    labels = jnp.arange(7) % 5
    jax.block_until_ready(loss(logits, labels))
    assert calls["logits_gradient"] == 0, "the forward must not compute the gradient"
    jax.grad(loss)(logits, labels)
    assert calls["logits_gradient"] >= 1, "jax.grad bypassed the custom rule"


def test_jaxpr_contains_the_custom_vjp_call():
    logits = jnp.zeros((3, 4))
    jaxpr = jax.make_jaxpr(lambda z: cross_entropy(z, jnp.array([0, 1, 2])))(logits)
    assert "custom_vjp_call" in str(jaxpr)
    jaxpr = jax.make_jaxpr(lambda z: integer_loss(z, jnp.array([0, 1, 2])))(logits)
    assert "custom_jvp_call" in str(jaxpr)


def test_a_wrong_rule_would_be_caught(monkeypatch):
    """Sanity check of the test design: a sabotaged rule changes the gradient."""
    logits = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    labels = jnp.array([0, 1, 2, 0])
    good = jax.grad(cross_entropy)(logits, labels)
    original = _rule._logits_gradient
    monkeypatch.setattr(_rule, "_logits_gradient", lambda *a, **k: 2 * original(*a, **k))
    jax.clear_caches()
    bad = jax.grad(cross_entropy)(logits, labels)
    assert not np.allclose(good, bad)


def residual_arrays(fn, logits):
    _, pullback = jax.vjp(fn, logits)
    return [leaf for leaf in jax.tree_util.tree_leaves(pullback) if hasattr(leaf, "shape")]


@pytest.mark.parametrize(
    "loss,logits_sized",
    [
        (lambda z: cross_entropy(z, jnp.arange(64) % 1000, label_smoothing=0.1, z_loss=1e-4), 1),
        (lambda z: jnp.sum(integer_loss(z, jnp.arange(64) % 1000)), 1),
        (lambda z: cross_entropy(z, jnp.full((64, 1000), 1e-3), label_smoothing=0.1), 2),
        (lambda z: jnp.sum(softmax_cross_entropy(z, jnp.full((64, 1000), 1e-3))), 2),
    ],
    ids=["cross_entropy", "integer_dropin", "cross_entropy_probabilities", "probability_dropin"],
)
def test_residuals_are_the_logits_and_per_row_statistics(loss, logits_sized):
    """Integer labels keep one logits-sized residual (the logits); probability targets may
    add a second one, the targets themselves, and nothing else."""
    logits = jax.random.normal(jax.random.PRNGKey(2), (64, 1000))
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
    logits32 = 4 * jax.random.normal(jax.random.PRNGKey(3), (32, 50))
    logits = logits32.astype(dtype)
    labels = jnp.arange(32) % 50
    value, grad = jax.jit(jax.value_and_grad(cross_entropy))(logits, labels)
    assert value.dtype == dtype and grad.dtype == dtype
    upcast = logits.astype(jnp.float32)
    value32, grad32 = jax.value_and_grad(cross_entropy)(upcast, labels)
    # Rounding only at the end: within one half-precision ulp of the f32 computation.
    np.testing.assert_allclose(np.float32(value), value32, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(grad, np.float32), grad32, rtol=1e-2, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(jax.grad(cross_entropy))(logits, labels))
    assert "reduce_sum" in jaxpr and "f32[32,50]" in jaxpr


def test_huge_logits_are_finite_and_exact_where_naive_fails():
    logits = jnp.array([[1e30, -1e30, 0.0], [1e30, 1e30, -1e30], [-1e30, 5.0, 1e30]], jnp.float32)
    labels = jnp.array([0, 1, 1])
    per = cross_entropy(logits, labels, reduction="none")
    np.testing.assert_allclose(per, [0.0, np.log(2.0), 1e30 - 5.0], rtol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(cross_entropy(z, labels, reduction="none")))(logits)
    np.testing.assert_allclose(grad, [[0, 0, 0], [0.5, -0.5, 0], [0, -1, 1]], atol=1e-7)
    naive = -jnp.sum(jax.nn.one_hot(labels, 3) * jnp.log(jax.nn.softmax(logits)), -1)
    assert not np.all(np.isfinite(naive)) or not np.allclose(naive, per)
    naive_grad = jax.grad(
        lambda z: -jnp.sum(jax.nn.one_hot(labels, 3) * jnp.log(jax.nn.softmax(z)))
    )(logits)
    assert not np.all(np.isfinite(naive_grad))


def test_minus_inf_logits_on_classes_without_target_mass_are_finite():
    logits = jnp.array([[0.0, -jnp.inf, 1.0, -jnp.inf], [2.0, 0.5, -jnp.inf, -1.0]])
    labels = jnp.array([2, 0])
    probs = jnp.array([[0.5, 0.0, 0.5, 0.0], [0.2, 0.8, 0.0, 0.0]])
    for targets in (labels, probs):
        value, grad = jax.value_and_grad(cross_entropy)(logits, targets)
        assert np.isfinite(value) and np.all(np.isfinite(grad))
        expected = reference.cross_entropy(np.asarray(logits), np.asarray(targets))
        np.testing.assert_allclose(value, expected, rtol=1e-6)
        assert grad[0, 1] == 0.0 and grad[1, 2] == 0.0
    value, grad = jax.value_and_grad(lambda z: jnp.sum(integer_loss(z, labels)))(logits)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_label_smoothing_on_a_minus_inf_class_is_infinite_as_the_math_says():
    logits = jnp.array([[0.0, -jnp.inf, 1.0]])
    value = cross_entropy(logits, jnp.array([0]), label_smoothing=0.1)
    assert value == jnp.inf


def test_compute_dtype():
    assert _rule.compute_dtype(jnp.bfloat16) == jnp.float32
    assert _rule.compute_dtype(jnp.float16) == jnp.float32
    assert _rule.compute_dtype(jnp.float32) == jnp.float32
    assert _rule.compute_dtype(np.float64) == np.float64


def test_rule_options_are_static_and_hashable():
    options = _rule.RuleOptions(label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0)
    assert hash(options) == hash(_rule.RuleOptions(0.1, 1e-4, 30.0))
    f = functools.partial(_rule.softmax_cross_entropy_rows, options=options)
    out = jax.jit(f)(jnp.zeros((2, 3)), jnp.array([0, 1]), None, None, None)
    np.testing.assert_allclose(out, [np.log(3.0) + 1e-4 * np.log(3.0) ** 2] * 2, rtol=1e-6)


def test_compiled_loss_and_gradient_write_one_logits_sized_array():
    """Forward and backward compiled together (``value_and_grad`` under ``jit``) read the
    logits three times and write exactly one ``[N, C]`` array: the gradient. A backward that
    shares an intermediate with the forward (``z - m``) makes XLA write that intermediate
    out as well. Compiled for the CPU, whose fusion decisions this pins."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    logits = jax.ShapeDtypeStruct((256, 1000), jnp.float32, sharding=cpu)
    labels = jax.ShapeDtypeStruct((256,), jnp.int32, sharding=cpu)
    hlo = jax.jit(jax.value_and_grad(cross_entropy)).lower(logits, labels).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    written = [
        line
        for line in entry.splitlines()
        if " = f32[256,1000]" in line and "parameter(" not in line
    ]
    assert len(written) == 1, "\n".join(written)

"""The drop-in names against optax: same signatures, shapes, values and gradients,
plus forward mode (jvp, jacfwd, hessian) through the derived rule."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sample
from jax.test_util import check_grads

import jaxsoftmax

CASES = [
    ((4, 5), -1),
    ((3, 4, 6), -1),
    ((6, 4), 0),
    ((2, 3, 4, 5), (2, 3)),
    ((2, 3, 4, 5), (3, 1)),
    ((3, 7), (-1,)),
]


def problem(shape, axis, seed=0):
    k1, k2, k3 = sample.split(seed, 3)
    logits = sample.normal(k1, shape, scale=2.0)
    axes = (axis,) if isinstance(axis, int) else axis
    axes = tuple(a % len(shape) for a in axes)
    batch = tuple(s for i, s in enumerate(shape) if i not in axes)
    num_classes = int(np.prod([shape[a] for a in axes]))
    labels = sample.integers(k2, batch, 0, num_classes)
    probs = sample.probabilities(k3, shape, axis=axes)
    return logits, labels, probs


def with_optax_strictness(fn):
    """optax itself relies on rank promotion; run its side with the default config."""

    def wrapped(*args, **kwargs):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            return fn(*args, **kwargs)

    return wrapped


OPTAX_INT = with_optax_strictness(optax.softmax_cross_entropy_with_integer_labels)
OPTAX_PROB = with_optax_strictness(optax.softmax_cross_entropy)


def test_signatures_match_optax_positionally():
    for ours, theirs in [
        (jaxsoftmax.softmax_cross_entropy, optax.softmax_cross_entropy),
        (
            jaxsoftmax.softmax_cross_entropy_with_integer_labels,
            optax.softmax_cross_entropy_with_integer_labels,
        ),
    ]:
        ours_params = [
            p for p in inspect.signature(ours).parameters.values() if p.kind is not p.KEYWORD_ONLY
        ]
        theirs_params = list(inspect.signature(theirs).parameters.values())
        assert [(p.name, p.default) for p in ours_params] == [
            (p.name, p.default) for p in theirs_params
        ]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape,axis", CASES)
def test_integer_labels_match_optax(shape, axis, jit):
    logits, labels, _ = problem(shape, axis)
    ours = jaxsoftmax.softmax_cross_entropy_with_integer_labels
    if jit:
        ours = jax.jit(ours, static_argnums=2)
    got = ours(logits, labels, axis)
    expected = OPTAX_INT(logits, labels, axis)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    g_ours = jax.grad(lambda z: jnp.sum(ours(z, labels, axis) ** 2))(logits)
    g_optax = jax.grad(lambda z: jnp.sum(OPTAX_INT(z, labels, axis) ** 2))(logits)
    np.testing.assert_allclose(g_ours, g_optax, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis", CASES[:4])
def test_probability_labels_match_optax_including_label_gradient(shape, axis):
    logits, _, probs = problem(shape, axis)
    f = jax.jit(jaxsoftmax.softmax_cross_entropy, static_argnums=2)
    got = f(logits, probs, axis)
    expected = OPTAX_PROB(logits, probs, axis)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    for argnum in (0, 1):
        g_ours = jax.grad(lambda z, y: jnp.sum(f(z, y, axis) ** 2), argnum)(logits, probs)
        g_optax = jax.grad(lambda z, y: jnp.sum(OPTAX_PROB(z, y, axis) ** 2), argnum)(logits, probs)
        np.testing.assert_allclose(g_ours, g_optax, rtol=1e-5, atol=1e-6)


def test_axis_none_reduces_everything_like_optax():
    logits, _, probs = problem((3, 4), -1)
    got = jaxsoftmax.softmax_cross_entropy(logits, probs, None)
    np.testing.assert_allclose(got, OPTAX_PROB(logits, probs / 3, None) * 3, rtol=1e-6)
    assert got.shape == ()


@pytest.mark.parametrize("kind", ["per_example", "per_logit"])
def test_where_matches_optax_on_rows_that_are_not_fully_masked(kind):
    logits, labels, probs = problem((6, 5), -1, seed=3)
    if kind == "per_example":
        where = jnp.array([True, False, True, True, False, True])
    else:
        where = sample.bernoulli(4, 0.7, (6, 5))
        where = where.at[jnp.arange(6), labels].set(True)
    got = jaxsoftmax.softmax_cross_entropy_with_integer_labels(logits, labels, where=where)
    np.testing.assert_allclose(got, OPTAX_INT(logits, labels, where=where), rtol=1e-6, atol=1e-6)
    got = jaxsoftmax.softmax_cross_entropy(logits, probs, where=where)
    np.testing.assert_allclose(got, OPTAX_PROB(logits, probs, where=where), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["per_example", "per_logit"])
def test_fully_masked_rows_give_zero_gradients_where_optax_label_gradient_is_nan(kind):
    """As the module docstring says: on a fully masked row both libraries give a zero loss
    and a zero logits gradient; optax's gradient with respect to probability labels is NaN
    there, ours is zero."""
    logits, labels, probs = problem((3, 4), -1, seed=5)
    where = jnp.array([True, False, True])
    if kind == "per_logit":
        where = jnp.broadcast_to(where[:, None], logits.shape)
    total = lambda f: lambda z, y: jnp.sum(f(z, y, where=where))
    for ours, theirs, targets in [
        (jaxsoftmax.softmax_cross_entropy_with_integer_labels, OPTAX_INT, labels),
        (jaxsoftmax.softmax_cross_entropy, OPTAX_PROB, probs),
    ]:
        loss = ours(logits, targets, where=where)
        np.testing.assert_allclose(loss, theirs(logits, targets, where=where), rtol=1e-6)
        assert loss[1] == 0.0
        grad = jax.grad(total(ours))(logits, targets)
        np.testing.assert_array_equal(grad[1], np.zeros(4))
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, jax.grad(total(theirs))(logits, targets), atol=1e-6)
    label_grad = jax.grad(total(jaxsoftmax.softmax_cross_entropy), argnums=1)(logits, probs)
    np.testing.assert_array_equal(label_grad[1], np.zeros(4))
    assert np.all(np.isfinite(label_grad))
    optax_label_grad = jax.grad(total(OPTAX_PROB), argnums=1)(logits, probs)
    assert np.all(np.isnan(optax_label_grad[1]))
    np.testing.assert_allclose(label_grad[0::2], optax_label_grad[0::2], rtol=1e-5)


@pytest.mark.parametrize("shape,axis", [((4, 5), -1), ((2, 3, 4), 1), ((2, 3, 4), (1, 2))])
def test_forward_mode_jvp_and_jacfwd_match_optax(shape, axis):
    logits, labels, probs = problem(shape, axis, seed=6)
    tangent = sample.normal(7, shape)
    ours = lambda z: jaxsoftmax.softmax_cross_entropy_with_integer_labels(z, labels, axis)
    theirs = lambda z: OPTAX_INT(z, labels, axis)
    _, t_ours = jax.jvp(ours, (logits,), (tangent,))
    _, t_theirs = jax.jvp(theirs, (logits,), (tangent,))
    np.testing.assert_allclose(t_ours, t_theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.jacfwd(ours)(logits), jax.jacrev(theirs)(logits), rtol=1e-5, atol=1e-6
    )
    ours_p = lambda z, y: jaxsoftmax.softmax_cross_entropy(z, y, axis)
    theirs_p = lambda z, y: OPTAX_PROB(z, y, axis)
    t_y = sample.normal(8, shape)
    np.testing.assert_allclose(
        jax.jvp(ours_p, (logits, probs), (tangent, t_y))[1],
        jax.jvp(theirs_p, (logits, probs), (tangent, t_y))[1],
        rtol=1e-5,
        atol=1e-6,
    )


def test_hessian_matches_softmax_jacobian():
    """d2L/dz2 = diag(s) - s s^T for each row: the softmax Jacobian of the seeds."""
    logits, labels, _ = problem((3, 4), -1, seed=9)
    hess = jax.hessian(
        lambda z: jnp.sum(jaxsoftmax.softmax_cross_entropy_with_integer_labels(z, labels))
    )(logits)
    s = np.asarray(jax.nn.softmax(logits), np.float64)
    for n in range(3):
        expected = np.diag(s[n]) - np.outer(s[n], s[n])
        np.testing.assert_allclose(hess[n, :, n, :], expected, rtol=1e-5, atol=1e-6)
        other = [m for m in range(3) if m != n]
        np.testing.assert_array_equal(hess[n, :, other, :], 0.0)


def test_finite_differences_both_modes():
    with jax.enable_x64(True):
        logits, labels, probs = problem((3, 5), -1, seed=10)
        logits, probs = logits.astype(jnp.float64), probs.astype(jnp.float64)
        check_grads(
            lambda z: jaxsoftmax.softmax_cross_entropy_with_integer_labels(z, labels),
            (logits,),
            order=2,
            modes=["fwd", "rev"],
        )
        check_grads(
            jaxsoftmax.softmax_cross_entropy, (logits, probs), order=2, modes=["fwd", "rev"]
        )


def test_vmap_over_logits_and_labels():
    logits, labels, probs = problem((5, 3, 4), -1, seed=11)
    f = jaxsoftmax.softmax_cross_entropy_with_integer_labels
    np.testing.assert_allclose(jax.vmap(f)(logits, labels), f(logits, labels), rtol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(jaxsoftmax.softmax_cross_entropy)(logits, probs),
        OPTAX_PROB(logits, probs),
        rtol=1e-6,
    )
    per_example_grads = jax.vmap(jax.grad(lambda z, y: jnp.sum(f(z, y))))(logits, labels)
    np.testing.assert_allclose(
        per_example_grads, jax.grad(lambda z: jnp.sum(f(z, labels)))(logits), rtol=1e-6
    )


HALF_TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-3}


def weighted_sum(per_example):
    """Sums with per-example weights that every float dtype holds exactly (0.5, 1, 2), so
    the cotangent reaching the rule is the same in half precision and in float32."""
    weights = jnp.array([0.5, 1.0, 2.0], per_example.dtype)
    return jnp.sum(per_example * jnp.resize(weights, per_example.shape))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_integer_dropin_keeps_half_precision_against_the_float32_computation(dtype):
    logits, labels, _ = problem((6, 4, 9), -1, seed=12)
    logits = logits.astype(dtype)
    ours = jaxsoftmax.softmax_cross_entropy_with_integer_labels
    per = jax.jit(ours)(logits, labels)
    grad = jax.jit(jax.grad(lambda z: weighted_sum(ours(z, labels))))(logits)
    assert per.dtype == logits.dtype and grad.dtype == logits.dtype
    upcast = logits.astype(jnp.float32)  # the same values, computed in float32 by optax
    tolerance = HALF_TOLERANCE[dtype]
    np.testing.assert_allclose(
        np.asarray(per, np.float32), OPTAX_INT(upcast, labels), rtol=tolerance
    )
    expected = jax.grad(lambda z: weighted_sum(OPTAX_INT(z, labels)))(upcast)
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), expected, rtol=tolerance, atol=tolerance * 1e-2
    )


@pytest.mark.parametrize("labels_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_probability_dropin_keeps_each_arguments_dtype_against_float32(dtype, labels_dtype):
    """The loss and the logits' gradient in the logits' dtype, the labels' gradient in the
    labels' dtype, each within one rounding of the float32 computation."""
    logits, _, probs = problem((6, 4, 9), -1, seed=13)
    logits = logits.astype(dtype)
    probs = probs.astype(dtype if labels_dtype == "same" else labels_dtype)
    ours = jaxsoftmax.softmax_cross_entropy
    per = jax.jit(ours)(logits, probs)
    d_logits, d_labels = jax.jit(jax.grad(lambda z, y: weighted_sum(ours(z, y)), (0, 1)))(
        logits, probs
    )
    assert per.dtype == logits.dtype and d_logits.dtype == logits.dtype
    assert d_labels.dtype == probs.dtype
    z32, y32 = logits.astype(jnp.float32), probs.astype(jnp.float32)
    tolerance = HALF_TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(per, np.float32), OPTAX_PROB(z32, y32), rtol=tolerance)
    expected = jax.grad(lambda z, y: weighted_sum(OPTAX_PROB(z, y)), (0, 1))(z32, y32)
    # Float32 labels get a float32 gradient: computed from the same logits in float32, it
    # matches optax's to float32 accuracy, with no half-precision rounding at all.
    labels_tolerance = 1e-5 if probs.dtype == jnp.float32 else tolerance
    for got, want, rtol in [
        (d_logits, expected[0], tolerance),
        (d_labels, expected[1], labels_tolerance),
    ]:
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=rtol * 1e-2)

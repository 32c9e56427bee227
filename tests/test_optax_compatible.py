"""The drop-in names against optax: same signatures, shapes, values and gradients,
plus forward mode (jvp, jacfwd, hessian) through the derived rule."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import sample

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
    """NumPy logits, labels and probabilities (no program compiled to draw them)."""
    k1, k2, k3 = sample.split(seed, 3)
    logits = sample.numpy_normal(k1, shape, scale=2.0)
    axes = (axis,) if isinstance(axis, int) else axis
    axes = tuple(a % len(shape) for a in axes)
    batch = tuple(s for i, s in enumerate(shape) if i not in axes)
    num_classes = int(np.prod([shape[a] for a in axes]))
    labels = sample.numpy_integers(k2, batch, 0, num_classes)
    probs = sample.numpy_probabilities(k3, shape, axis=axes)
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


def integer_value_and_gradient(fn, logits, labels, axis):
    """The per-example losses and the gradient of their sum of squares."""
    grad = jax.grad(lambda z: jnp.sum(fn(z, labels, axis) ** 2))(logits)
    return fn(logits, labels, axis), grad


def every_integer_case(fn):
    """:func:`integer_value_and_gradient` of ``fn`` for every case of CASES, in one program."""
    problems = [problem(shape, axis)[:2] for shape, axis in CASES]
    return jax.jit(
        lambda problems: [
            integer_value_and_gradient(fn, logits, labels, axis)
            for (logits, labels), (_, axis) in zip(problems, CASES)
        ]
    )(problems)


@functools.cache
def optax_integer_results():
    return every_integer_case(OPTAX_INT)


def assert_integer_case_matches_optax(case, got, expected):
    (value, grad), (expected_value, expected_grad) = got, expected
    assert value.shape == expected_value.shape, case
    np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6, err_msg=str(case))
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6, err_msg=str(case))


# The cases also called eagerly (each eager call compiles programs of its own): one int
# axis and tuple axes. Under jit, every case of CASES.
EAGER_CASES = [((4, 5), -1), ((2, 3, 4, 5), (3, 1))]


@pytest.mark.parametrize("shape,axis", EAGER_CASES)
def test_integer_labels_match_optax_eagerly(shape, axis):
    logits, labels = jax.device_put(problem(shape, axis)[:2])  # as users call it: jax.Arrays
    got = integer_value_and_gradient(
        jaxsoftmax.softmax_cross_entropy_with_integer_labels, logits, labels, axis
    )
    expected = optax_integer_results()[CASES.index((shape, axis))]
    assert_integer_case_matches_optax((shape, axis), got, expected)


def test_integer_labels_match_optax_under_jit():
    """Every case of CASES, in one program."""
    got = every_integer_case(jaxsoftmax.softmax_cross_entropy_with_integer_labels)
    for case, ours, expected in zip(CASES, got, optax_integer_results(), strict=True):
        assert_integer_case_matches_optax(case, ours, expected)


def test_probability_labels_match_optax_including_label_gradient():
    """The first four cases of CASES: ours in one program, optax's in another."""
    cases = CASES[:4]
    problems = [problem(shape, axis)[::2] for shape, axis in cases]

    def every_case(fn):
        def value_and_gradients(logits, probs, axis):
            grads = jax.grad(lambda z, y: jnp.sum(fn(z, y, axis) ** 2), (0, 1))(logits, probs)
            return fn(logits, probs, axis), grads

        return jax.jit(
            lambda problems: [
                value_and_gradients(logits, probs, axis)
                for (logits, probs), (_, axis) in zip(problems, cases)
            ]
        )(problems)

    got, want = every_case(jaxsoftmax.softmax_cross_entropy), every_case(OPTAX_PROB)
    for case, (value, grads), (expected, expected_grads) in zip(cases, got, want, strict=True):
        assert value.shape == expected.shape, case
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6, err_msg=str(case))
        for argnum in (0, 1):
            np.testing.assert_allclose(
                grads[argnum],
                expected_grads[argnum],
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{case} argnum {argnum}",
            )


def test_axis_none_reduces_everything_like_optax():
    logits, _, probs = problem((3, 4), -1)
    got, expected = jax.jit(
        lambda z, y: (
            jaxsoftmax.softmax_cross_entropy(z, y, None),
            OPTAX_PROB(z, y / 3, None) * 3,
        )
    )(logits, probs)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.shape == ()


def where_masks(labels):
    """The per-example and the per-logit mask of the ``where`` tests, (6, 5) logits."""
    per_logit = sample.numpy_bernoulli(4, 0.7, (6, 5))
    per_logit[np.arange(6), labels] = True
    return {"per_example": np.array([True, False, True, True, False, True]), "per_logit": per_logit}


def test_where_matches_optax_on_rows_that_are_not_fully_masked():
    """Both kinds of mask, both kinds of target: ours in one program, optax's in another."""
    logits, labels, probs = problem((6, 5), -1, seed=3)
    masks = where_masks(labels)

    def every_case(integer, probability):
        return jax.jit(
            lambda z, y, p, masks: {
                kind: (integer(z, y, where=where), probability(z, p, where=where))
                for kind, where in masks.items()
            }
        )(logits, labels, probs, masks)

    got = every_case(
        jaxsoftmax.softmax_cross_entropy_with_integer_labels, jaxsoftmax.softmax_cross_entropy
    )
    want = every_case(OPTAX_INT, OPTAX_PROB)
    for kind in masks:
        for target, ours, theirs in zip(("integer", "probability"), got[kind], want[kind]):
            np.testing.assert_allclose(
                ours, theirs, rtol=1e-6, atol=1e-6, err_msg=f"{kind} {target}"
            )


def fully_masked_results(integer, probability, logits, labels, probs):
    """For both kinds of mask: each target kind's loss and logits' gradient, and the
    probabilities' gradient."""
    results = {}
    for kind in ("per_example", "per_logit"):
        where = jnp.array([True, False, True])
        if kind == "per_logit":
            where = jnp.broadcast_to(where[:, None], logits.shape)
        total = lambda f, where=where: lambda z, y: jnp.sum(f(z, y, where=where))
        for name, fn, targets in [
            ("integer", integer, labels),
            ("probability", probability, probs),
        ]:
            results[kind, name] = (
                fn(logits, targets, where=where),
                jax.grad(total(fn))(logits, targets),
            )
        results[kind, "label_gradient"] = jax.grad(total(probability), argnums=1)(logits, probs)
    return results


def test_fully_masked_rows_give_zero_gradients_where_optax_label_gradient_is_nan():
    """As the module docstring says: on a fully masked row both libraries give a zero loss
    and a zero logits gradient; optax's gradient with respect to probability labels is NaN
    there, ours is zero. Per-example and per-logit masks: ours in one program, optax's in
    another."""
    logits, labels, probs = problem((3, 4), -1, seed=5)
    got = jax.jit(
        functools.partial(
            fully_masked_results,
            jaxsoftmax.softmax_cross_entropy_with_integer_labels,
            jaxsoftmax.softmax_cross_entropy,
        )
    )(logits, labels, probs)
    want = jax.jit(functools.partial(fully_masked_results, OPTAX_INT, OPTAX_PROB))(
        logits, labels, probs
    )
    got, want = jax.tree.map(np.asarray, (got, want))
    for kind in ("per_example", "per_logit"):
        for name in ("integer", "probability"):
            case = f"{kind} {name}"
            (loss, grad), (their_loss, their_grad) = got[kind, name], want[kind, name]
            np.testing.assert_allclose(loss, their_loss, rtol=1e-6, err_msg=case)
            assert loss[1] == 0.0, case
            np.testing.assert_array_equal(grad[1], np.zeros(4), err_msg=case)
            assert np.all(np.isfinite(grad)), case
            np.testing.assert_allclose(grad, their_grad, atol=1e-6, err_msg=case)
        label_grad = np.asarray(got[kind, "label_gradient"])
        np.testing.assert_array_equal(label_grad[1], np.zeros(4), err_msg=kind)
        assert np.all(np.isfinite(label_grad)), kind
        optax_label_grad = np.asarray(want[kind, "label_gradient"])
        assert np.all(np.isnan(optax_label_grad[1])), kind
        np.testing.assert_allclose(
            label_grad[0::2], optax_label_grad[0::2], rtol=1e-5, err_msg=kind
        )


FORWARD_CASES = [((4, 5), -1), ((2, 3, 4), 1), ((2, 3, 4), (1, 2))]


def test_forward_mode_jvp_and_jacfwd_match_optax():
    """Every case of FORWARD_CASES: ours (jvp, jacfwd) in one program, optax's (jvp,
    jacrev) in another."""
    problems = [
        (
            *problem(shape, axis, seed=6),
            sample.numpy_normal(7, shape),
            sample.numpy_normal(8, shape),
        )
        for shape, axis in FORWARD_CASES
    ]

    def every_case(integer, probability, jacobian):
        def one_case(logits, labels, probs, tangent, t_y, axis):
            f = lambda z: integer(z, labels, axis)
            return (
                jax.jvp(f, (logits,), (tangent,))[1],
                jacobian(f)(logits),
                jax.jvp(lambda z, y: probability(z, y, axis), (logits, probs), (tangent, t_y))[1],
            )

        return jax.jit(
            lambda problems: [
                one_case(*args, axis) for args, (_, axis) in zip(problems, FORWARD_CASES)
            ]
        )(problems)

    got = every_case(
        jaxsoftmax.softmax_cross_entropy_with_integer_labels,
        jaxsoftmax.softmax_cross_entropy,
        jax.jacfwd,
    )
    want = every_case(OPTAX_INT, OPTAX_PROB, jax.jacrev)
    for case, ours, theirs in zip(FORWARD_CASES, got, want, strict=True):
        for what, g, w in zip(("jvp", "jacobian", "probability jvp"), ours, theirs):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{case} {what}")


def test_hessian_matches_softmax_jacobian():
    """d2L/dz2 = diag(s) - s s^T for each row: the softmax Jacobian of the seeds."""
    logits, labels, _ = problem((3, 4), -1, seed=9)
    hess = jax.jit(
        jax.hessian(
            lambda z: jnp.sum(jaxsoftmax.softmax_cross_entropy_with_integer_labels(z, labels))
        )
    )(logits)
    hess = np.asarray(hess)
    z = np.asarray(logits, np.float64)
    s = np.exp(z - z.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    for n in range(3):
        expected = np.diag(s[n]) - np.outer(s[n], s[n])
        np.testing.assert_allclose(hess[n, :, n, :], expected, rtol=1e-5, atol=1e-6)
        other = [m for m in range(3) if m != n]
        np.testing.assert_array_equal(hess[n, :, other, :], 0.0)


def test_finite_differences_both_modes():
    """Forward and reverse mode to the second order against finite differences, as
    ``jax.test_util.check_grads`` checks them (each function's checks in one program)."""
    with jax.enable_x64(True):
        logits, labels, probs = problem((3, 5), -1, seed=10)
        logits, probs = (a.astype(np.float64) for a in (logits, probs))
        reference.check_grads_in_one_program(
            lambda z: jaxsoftmax.softmax_cross_entropy_with_integer_labels(z, labels),
            (logits,),
            order=2,
            modes=["fwd", "rev"],
        )
        reference.check_grads_in_one_program(
            jaxsoftmax.softmax_cross_entropy, (logits, probs), order=2, modes=["fwd", "rev"]
        )


def test_vmap_over_logits_and_labels():
    logits, labels, probs = problem((5, 3, 4), -1, seed=11)
    f = jaxsoftmax.softmax_cross_entropy_with_integer_labels

    def ours(logits, labels, probs):
        return (
            jax.vmap(f)(logits, labels),
            f(logits, labels),
            jax.vmap(jaxsoftmax.softmax_cross_entropy)(logits, probs),
            jax.vmap(jax.grad(lambda z, y: jnp.sum(f(z, y))))(logits, labels),
            jax.grad(lambda z: jnp.sum(f(z, labels)))(logits),
        )

    def ours_and_optax(logits, labels, probs):
        return ours(logits, labels, probs), OPTAX_PROB(logits, probs)

    (mapped, whole, mapped_probs, per_example_grads, grads), optax_probs = jax.jit(ours_and_optax)(
        logits, labels, probs
    )
    np.testing.assert_allclose(mapped, whole, rtol=1e-6)
    np.testing.assert_allclose(mapped_probs, optax_probs, rtol=1e-6)
    np.testing.assert_allclose(per_example_grads, grads, rtol=1e-6)


HALF_TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-3}


def weighted_sum(per_example):
    """Sums with per-example weights that every float dtype holds exactly (0.5, 1, 2), so
    the cotangent reaching the rule is the same in half precision and in float32."""
    weights = jnp.array([0.5, 1.0, 2.0], per_example.dtype)
    return jnp.sum(per_example * jnp.resize(weights, per_example.shape))


def test_integer_dropin_keeps_half_precision_against_the_float32_computation():
    """bfloat16 and float16: ours in one program, optax's float32 references in another."""
    logits, labels, _ = problem((6, 4, 9), -1, seed=12)
    half = {dtype: logits.astype(dtype) for dtype in HALF_TOLERANCE}

    def per_and_grad(fn):
        return lambda z: (fn(z, labels), jax.grad(lambda z: weighted_sum(fn(z, labels)))(z))

    ours = per_and_grad(jaxsoftmax.softmax_cross_entropy_with_integer_labels)
    got = jax.jit(lambda half: {dtype: ours(z) for dtype, z in half.items()})(half)
    # the same values, computed in float32 by optax
    theirs = per_and_grad(OPTAX_INT)
    want = jax.jit(
        lambda half: {dtype: theirs(z.astype(jnp.float32)) for dtype, z in half.items()}
    )(half)
    for dtype, tolerance in HALF_TOLERANCE.items():
        (per, grad), (expected_per, expected_grad) = got[dtype], want[dtype]
        assert per.dtype == half[dtype].dtype and grad.dtype == half[dtype].dtype, dtype
        np.testing.assert_allclose(
            np.asarray(per, np.float32), expected_per, rtol=tolerance, err_msg=dtype
        )
        np.testing.assert_allclose(
            np.asarray(grad, np.float32),
            expected_grad,
            rtol=tolerance,
            atol=tolerance * 1e-2,
            err_msg=dtype,
        )


def test_probability_dropin_keeps_each_arguments_dtype_against_float32():
    """The loss and the logits' gradient in the logits' dtype, the labels' gradient in the
    labels' dtype, each within one rounding of the float32 computation. Half-precision
    logits with labels of the same dtype or float32: ours in one program, optax's float32
    references in another."""
    logits, _, probs = problem((6, 4, 9), -1, seed=13)
    cases = [(dtype, labels) for dtype in HALF_TOLERANCE for labels in ("same", "float32")]
    inputs = {
        (dtype, labels): (
            logits.astype(dtype),
            probs.astype(dtype if labels == "same" else labels),
        )
        for dtype, labels in cases
    }

    def per_and_grads(fn):
        return lambda z, y: (
            fn(z, y),
            jax.grad(lambda z, y: weighted_sum(fn(z, y)), (0, 1))(z, y),
        )

    ours = per_and_grads(jaxsoftmax.softmax_cross_entropy)
    got = jax.jit(lambda inputs: {case: ours(*args) for case, args in inputs.items()})(inputs)
    theirs = per_and_grads(OPTAX_PROB)
    want = jax.jit(
        lambda inputs: {
            case: theirs(z.astype(jnp.float32), y.astype(jnp.float32))
            for case, (z, y) in inputs.items()
        }
    )(inputs)
    for case in cases:
        (z, y), (per, (d_logits, d_labels)) = inputs[case], got[case]
        expected_per, expected = want[case]
        assert per.dtype == z.dtype and d_logits.dtype == z.dtype, case
        assert d_labels.dtype == y.dtype, case
        tolerance = HALF_TOLERANCE[case[0]]
        np.testing.assert_allclose(
            np.asarray(per, np.float32), expected_per, rtol=tolerance, err_msg=str(case)
        )
        # Float32 labels get a float32 gradient: computed from the same logits in float32,
        # it matches optax's to float32 accuracy, with no half-precision rounding at all.
        labels_tolerance = 1e-5 if y.dtype == jnp.float32 else tolerance
        for what, got_grad, want_grad, rtol in [
            ("logits", d_logits, expected[0], tolerance),
            ("labels", d_labels, expected[1], labels_tolerance),
        ]:
            np.testing.assert_allclose(
                np.asarray(got_grad, np.float32),
                want_grad,
                rtol=rtol,
                atol=rtol * 1e-2,
                err_msg=f"{case} {what}",
            )

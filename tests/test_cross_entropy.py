"""cross_entropy against independent references: jax.grad of the naive composition,
float64 NumPy of PyTorch's documented semantics, finite differences."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import sample
from jax.test_util import check_grads

from jaxsoftmax import cross_entropy


def naive_loss(logits, labels, axis=-1):
    """The design's reference: -sum(y * log(softmax(z))), averaged over examples."""
    num_classes = logits.shape[axis]
    y = jnp.moveaxis(jax.nn.one_hot(labels, num_classes, dtype=logits.dtype), -1, axis)
    return -jnp.mean(jnp.sum(y * jnp.log(jax.nn.softmax(logits, axis=axis)), axis=axis))


def random_problem(seed, shape, axis=-1, dtype=jnp.float32, scale=3.0):
    k1, k2 = sample.split(seed, 2)
    logits = sample.normal(k1, shape, dtype, scale=scale)
    num_classes = shape[axis]
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    # JAX's default int: int64 under x64
    labels = sample.integers(k2, batch, 0, num_classes, dtype=int)
    return logits, labels


SHAPES_AND_AXES = [
    ((5, 3), -1),
    ((7, 11), -1),
    ((2, 3, 4), -1),
    ((4, 6), 0),
    ((3, 5, 2), 1),
    ((1, 2), -1),
    ((16, 128), -1),
]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
def test_value_and_gradient_match_naive_composition(shape, axis, jit):
    logits, labels = random_problem(0, shape, axis)
    ours = functools.partial(cross_entropy, axis=axis)
    naive = functools.partial(naive_loss, axis=axis)
    if jit:
        ours, naive = jax.jit(ours), jax.jit(naive)
    value, grad = jax.value_and_grad(ours)(logits, labels)
    expected_value, expected_grad = jax.value_and_grad(naive)(logits, labels)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


def naive_composition(logits, targets, axes):
    """-sum(y * log(softmax(z))) over the class axes, averaged over examples, in the logits'
    own layout: integer labels (row-major flat indices into the class axes, in the order
    given) become a one-hot over those axes, moved into place."""
    axes = tuple(a % logits.ndim for a in axes)
    y = targets
    if jnp.issubdtype(targets.dtype, jnp.integer):
        sizes = tuple(logits.shape[a] for a in axes)
        y = jax.nn.one_hot(targets, math.prod(sizes), dtype=logits.dtype)
        y = jnp.moveaxis(y.reshape(targets.shape + sizes), range(targets.ndim, logits.ndim), axes)
    return -jnp.mean(jnp.sum(y * jnp.log(jax.nn.softmax(logits, axis=axes)), axis=axes))


TUPLE_AXES = [
    ((2, 3, 4, 5), (2, 3)),
    ((2, 3, 4, 5), (3, 1)),
    ((3, 4, 6), (0, 2)),
    ((3, 7), (-1,)),
    ((4, 6), 0),
]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kind", ["labels", "probabilities"])
@pytest.mark.parametrize("shape,axis", TUPLE_AXES)
def test_tuple_axes_and_probability_targets_match_naive_composition(shape, axis, kind, jit):
    """Values, the logits' gradient and (for probabilities) the targets' gradient."""
    axes = (axis,) if isinstance(axis, int) else axis
    logits = sample.normal(21, shape, scale=3.0)
    if kind == "labels":
        batch = tuple(s for i, s in enumerate(shape) if i not in {a % len(shape) for a in axes})
        num_classes = math.prod(shape[a] for a in axes)
        targets = sample.integers(22, batch, 0, num_classes)
        argnums = 0
    else:
        targets = sample.probabilities(22, shape, axis=axes)
        argnums = (0, 1)
    ours = functools.partial(cross_entropy, axis=axis)
    naive = functools.partial(naive_composition, axes=axes)
    if jit:
        ours, naive = jax.jit(ours), jax.jit(naive)
    value, grad = jax.value_and_grad(ours, argnums)(logits, targets)
    expected_value, expected_grad = jax.value_and_grad(naive, argnums)(logits, targets)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(5, 3), (8, 10), (3, 4, 7)])
def test_gradient_is_the_closed_form_softmax_minus_one_hot(shape):
    logits, labels = random_problem(1, shape)
    g = sample.uniform(2, shape[:-1])
    grad = jax.grad(lambda z: jnp.sum(g * cross_entropy(z, labels, reduction="none")))(logits)
    expected = reference.closed_form_gradient(logits, labels, g)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_mean_divides_each_row_by_n():
    logits, labels = random_problem(3, (6, 4))
    grad = jax.grad(cross_entropy)(logits, labels)
    np.testing.assert_allclose(
        grad, reference.closed_form_gradient(logits, labels) / 6, rtol=1e-5, atol=1e-8
    )


def test_float64_values_and_gradient_against_numpy():
    with jax.enable_x64(True):
        logits, labels = random_problem(4, (9, 13), dtype=jnp.float64)
        assert logits.dtype == jnp.float64
        value, grad = jax.value_and_grad(cross_entropy)(logits, labels)
        assert value.dtype == jnp.float64 and grad.dtype == jnp.float64
        np.testing.assert_allclose(value, reference.cross_entropy(logits, labels), rtol=1e-13)
        np.testing.assert_allclose(
            grad, reference.closed_form_gradient(logits, labels) / 9, rtol=1e-12, atol=1e-15
        )


def test_finite_differences_reverse_mode():
    with jax.enable_x64(True):
        logits, labels = random_problem(5, (4, 6), dtype=jnp.float64)
        w = jnp.linspace(0.5, 2.0, 6)
        f = functools.partial(
            cross_entropy,
            targets=labels,
            label_smoothing=0.1,
            class_weights=w,
            z_loss=1e-2,
            logit_softcap=5.0,
        )
        check_grads(lambda z: f(z), (logits,), order=2, modes=["rev"])


def test_finite_differences_with_probability_targets_both_arguments():
    with jax.enable_x64(True):
        logits, _ = random_problem(6, (3, 5), dtype=jnp.float64)
        probs = sample.probabilities(7, (3, 5), jnp.float64)
        check_grads(
            lambda z, y: cross_entropy(z, y, label_smoothing=0.2),
            (logits, probs),
            order=1,
            modes=["rev"],
        )


OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"class_weights": np.array([0.5, 1.0, 2.0, 0.25, 1.5, 3.0], np.float32)},
    {"ignore_index": 2},
    {"z_loss": 1e-3},
    {"logit_softcap": 2.5},
    {
        "class_weights": np.array([0.5, 1.0, 2.0, 0.25, 1.5, 3.0], np.float32),
        "label_smoothing": 0.3,
        "ignore_index": 1,
        "z_loss": 1e-2,
        "logit_softcap": 4.0,
    },
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_options_against_numpy_reference_of_pytorch_semantics(options, reduction):
    logits, labels = random_problem(8, (12, 6))
    options = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    got = jax.jit(functools.partial(cross_entropy, reduction=reduction, **options))(logits, labels)
    np_options = {k: np.asarray(v) if isinstance(v, jax.Array) else v for k, v in options.items()}
    expected = reference.cross_entropy(
        np.asarray(logits), np.asarray(labels), reduction=reduction, **np_options
    )
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_option_gradients_match_autodiff_of_the_documented_formula(options):
    """The derived rule with every option equals jax.grad of the plain formula."""
    logits, labels = random_problem(9, (10, 6))
    eps = options.get("label_smoothing", 0.0)
    w = jnp.asarray(options.get("class_weights", np.ones(6, np.float32)))
    ignore = options.get("ignore_index")
    beta = options.get("z_loss", 0.0)
    cap = options.get("logit_softcap")

    def formula(z):
        if cap is not None:
            z = cap * jnp.tanh(z / cap)
        logp = jax.nn.log_softmax(z)
        lse = jax.nn.logsumexp(z, axis=-1)
        kept = jnp.ones(labels.shape, bool) if ignore is None else labels != ignore
        y = jax.nn.one_hot(labels, 6)
        q = w[None, :] * ((1 - eps) * y + eps / 6)
        r = w[labels]
        per = -jnp.sum(q * logp, -1) + beta * r * lse**2
        return jnp.sum(jnp.where(kept, per, 0.0)) / jnp.sum(jnp.where(kept, r, 0.0))

    got = jax.jit(jax.grad(lambda z: cross_entropy(z, labels, **options)))(logits)
    np.testing.assert_allclose(got, jax.grad(formula)(logits), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("logit_softcap", [None, 3.0])
def test_class_mask_gradients_with_every_option_match_autodiff_of_the_masked_formula(
    logit_softcap,
):
    """``where`` of the logits' shape (classes taking part) with smoothing, z-loss and a soft
    cap: masked classes get zero gradient, never ``0 * inf``, even though the cap's derivative
    is evaluated on every class."""
    logits, labels = random_problem(14, (9, 7))
    mask = sample.bernoulli(15, 0.6, (9, 7))
    mask = mask.at[jnp.arange(9), labels].set(True)  # each label takes part
    eps, beta = 0.2, 1e-2

    def formula(z):
        if logit_softcap is not None:
            z = logit_softcap * jnp.tanh(z / logit_softcap)
        z = jnp.where(mask, z, -jnp.inf)
        logp = jax.nn.log_softmax(z)
        k = jnp.sum(mask, -1, keepdims=True).astype(jnp.float32)
        q = (1 - eps) * jax.nn.one_hot(labels, 7) + jnp.where(mask, eps / k, 0.0)
        per = -jnp.sum(jnp.where(q != 0, q * logp, 0.0), -1)
        return jnp.mean(per + beta * jax.nn.logsumexp(z, axis=-1) ** 2)

    def loss(z):
        return cross_entropy(
            z, labels, where=mask, label_smoothing=eps, z_loss=beta, logit_softcap=logit_softcap
        )

    value, grad = jax.jit(jax.value_and_grad(loss))(logits)
    want_value, want_grad = jax.value_and_grad(formula)(logits)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)


def test_probability_targets_with_weights_and_smoothing_against_numpy():
    logits, _ = random_problem(10, (7, 5))
    probs = sample.probabilities(11, (7, 5))
    w = jnp.array([1.0, 0.5, 2.0, 1.0, 3.0])
    for reduction in ("mean", "sum", "none"):
        got = cross_entropy(
            logits, probs, class_weights=w, label_smoothing=0.2, reduction=reduction
        )
        expected = reference.cross_entropy(
            np.asarray(logits),
            np.asarray(probs),
            class_weights=w,
            label_smoothing=0.2,
            reduction=reduction,
        )
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)


def test_probability_target_gradient_is_minus_log_softmax():
    logits, _ = random_problem(12, (4, 5))
    probs = sample.probabilities(13, (4, 5))
    grad = jax.grad(
        lambda y: cross_entropy(logits, y, reduction="sum"),
    )(probs)
    np.testing.assert_allclose(grad, -reference.log_softmax(logits)[0], rtol=1e-5, atol=1e-6)


def test_where_per_example_and_per_logit():
    logits, labels = random_problem(14, (6, 5))
    rows = jnp.array([True, False, True, True, False, True])
    classes = sample.bernoulli(15, 0.7, (6, 5))
    classes = classes.at[jnp.arange(6), labels].set(True)
    for where in (rows, classes):
        got = cross_entropy(logits, labels, where=where, reduction="none")
        expected = reference.cross_entropy(
            np.asarray(logits), np.asarray(labels), where=np.asarray(where), reduction="none"
        )
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_all_ignored_batch_gives_zero_and_zero_gradient():
    logits, _ = random_problem(16, (4, 3))
    labels = jnp.full((4,), -100)
    value, grad = jax.value_and_grad(cross_entropy)(logits, labels, ignore_index=-100)
    assert value == 0.0
    np.testing.assert_array_equal(grad, jnp.zeros_like(logits))


def test_fully_masked_rows_give_zero_loss_and_finite_zero_gradient():
    logits, labels = random_problem(17, (3, 4))
    where = jnp.array([[True] * 4, [False] * 4, [True, False, True, True]])
    loss, grad = jax.value_and_grad(
        lambda z: cross_entropy(z, labels, where=where, reduction="sum")
    )(logits)
    per = cross_entropy(logits, labels, where=where, reduction="none")
    assert per[1] == 0.0
    np.testing.assert_array_equal(grad[1], jnp.zeros(4))
    assert jnp.all(jnp.isfinite(grad)) and jnp.isfinite(loss)


def test_label_out_of_range_gives_nan_for_its_row_only():
    logits, _ = random_problem(18, (3, 4))
    labels = jnp.array([0, 7, 2])
    per, grad = (
        jax.jit(jax.value_and_grad(lambda z: jnp.sum(cross_entropy(z, labels, reduction="none"))))(
            logits
        ),
        None,
    )
    per_rows = cross_entropy(logits, labels, reduction="none")
    assert jnp.isnan(per_rows[1]) and jnp.all(jnp.isfinite(per_rows[jnp.array([0, 2])]))
    grad = jax.grad(lambda z: jnp.sum(cross_entropy(z, labels, reduction="none")))(logits)
    assert jnp.all(jnp.isnan(grad[1])) and jnp.all(jnp.isfinite(grad[0]))
    assert jnp.isnan(per[0])


def test_docstring_formula_seeds_case():
    """The seeds' network output: 5 examples, 3 classes, L = -(1/N) sum y . log(yhat)."""
    logits, labels = random_problem(19, (5, 3))
    yhat = np.exp(reference.log_softmax(logits)[0])
    y = np.eye(3)[np.asarray(labels)]
    expected = -np.mean(np.sum(y * np.log(yhat), -1))
    np.testing.assert_allclose(cross_entropy(logits, labels), expected, rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(cross_entropy)(logits, labels), (yhat - y) / 5, rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("shape,axis", [((6, 7), -1), ((3, 4, 5), 1)])
def test_dtypes_against_naive_composition_in_float32_or_float64(dtype, shape, axis):
    """Half precision is computed in f32 and rounded once; f64 stays f64 under x64."""
    with jax.enable_x64(dtype == "float64"):
        logits, labels = random_problem(20, shape, axis, dtype=jnp.dtype(dtype))
        reference_dtype = jnp.float64 if dtype == "float64" else jnp.float32
        value, grad = jax.jit(jax.value_and_grad(functools.partial(cross_entropy, axis=axis)))(
            logits, labels
        )
        assert value.dtype == logits.dtype and grad.dtype == logits.dtype
        expected_value, expected_grad = jax.value_and_grad(
            functools.partial(naive_loss, axis=axis)
        )(logits.astype(reference_dtype), labels)
        tolerance = {"bfloat16": 1e-2, "float16": 1e-3, "float32": 1e-6, "float64": 1e-13}[dtype]
        np.testing.assert_allclose(np.asarray(value, np.float64), expected_value, rtol=tolerance)
        np.testing.assert_allclose(
            np.asarray(grad, np.float64), expected_grad, rtol=tolerance, atol=tolerance * 1e-2
        )

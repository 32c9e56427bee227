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

import jaxsoftmax
from jaxsoftmax import cross_entropy


def naive_loss(logits, labels, axis=-1):
    """The design's reference: -sum(y * log(softmax(z))), averaged over examples."""
    num_classes = logits.shape[axis]
    y = jnp.moveaxis(jax.nn.one_hot(labels, num_classes, dtype=logits.dtype), -1, axis)
    return -jnp.mean(jnp.sum(y * jnp.log(jax.nn.softmax(logits, axis=axis)), axis=axis))


def random_problem(seed, shape, axis=-1, dtype=np.float32, scale=3.0):
    """NumPy logits and labels (no program compiled to draw them: tests/sample.py)."""
    k1, k2 = sample.split(seed, 2)
    logits = sample.numpy_normal(k1, shape, dtype, scale=scale)
    num_classes = shape[axis]
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    # int64: JAX's default int under x64, int32 once a program takes it without x64
    labels = sample.numpy_integers(k2, batch, 0, num_classes, dtype=int)
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


def numpy_naive_composition(logits, targets, axes):
    """-sum(y * log(softmax(z))) over the class axes, averaged over examples, and its gradient
    (the logits', and the targets' for probabilities), in float64 NumPy: the class axes moved
    last in the order given and flattened (integer labels are row-major flat indices into
    them), each row's loss and gradient from tests/reference.py, moved back into place."""
    axes = tuple(a % logits.ndim for a in axes)
    last = tuple(range(logits.ndim - len(axes), logits.ndim))
    z = np.moveaxis(np.asarray(logits, np.float64), axes, last)
    batch_shape, classes_shape = z.shape[: -len(axes)], z.shape[-len(axes) :]
    z = z.reshape(-1, math.prod(classes_shape))
    integer = np.issubdtype(targets.dtype, np.integer)
    if integer:
        y = np.eye(z.shape[-1])[targets.reshape(-1)]
    else:
        y = np.moveaxis(np.asarray(targets, np.float64), axes, last).reshape(z.shape)
    loss, grad = reference.loss_and_gradient(z, y)
    n = z.shape[0]

    def in_place(rows):
        return np.moveaxis((rows / n).reshape(batch_shape + classes_shape), last, axes)

    if integer:
        return loss.mean(), in_place(grad)
    return loss.mean(), (in_place(grad), in_place(-reference.log_softmax(z)[0]))


TUPLE_AXES = [
    ((2, 3, 4, 5), (2, 3)),
    ((2, 3, 4, 5), (3, 1)),
    ((3, 4, 6), (0, 2)),
    ((3, 7), (-1,)),
    ((4, 6), 0),
]

# Every case compared with the naive composition (in float64 NumPy): (shape, axis, kind).
# "single_axis" is one class axis, "labels" and "probabilities" are tuple axes (or an int),
# the latter with the targets' gradient too. Integer labels over an int axis of
# SHAPES_AND_AXES are its "single_axis" case already.
NAIVE_CASES = [(shape, axis, "single_axis") for shape, axis in SHAPES_AND_AXES] + [
    (shape, axis, kind)
    for shape, axis in TUPLE_AXES
    for kind in ("labels", "probabilities")
    if not (kind == "labels" and (shape, axis) in SHAPES_AND_AXES)
]
# The cases also called eagerly (each eager call compiles programs of its own): one class
# axis, last and inner, and tuple axes, with labels and with probabilities. Under jit, every
# case of NAIVE_CASES.
EAGER_CASES = [
    ((5, 3), -1, "single_axis"),
    ((3, 5, 2), 1, "single_axis"),
    ((2, 3, 4, 5), (3, 1), "labels"),
    ((2, 3, 4, 5), (3, 1), "probabilities"),
]


def naive_case(shape, axis, kind):
    """``(ours, naive, logits, targets, argnums)`` of one case of NAIVE_CASES, ``naive``
    the NumPy value and gradients."""
    axes = (axis,) if isinstance(axis, int) else axis
    naive = functools.partial(numpy_naive_composition, axes=axes)
    if kind == "single_axis":
        logits, labels = random_problem(0, shape, axis)
        ours = functools.partial(cross_entropy, axis=axis)
        return ours, naive, logits, labels, 0
    logits = sample.numpy_normal(21, shape, scale=3.0)
    if kind == "labels":
        batch = tuple(s for i, s in enumerate(shape) if i not in {a % len(shape) for a in axes})
        num_classes = math.prod(shape[a] for a in axes)
        targets, argnums = sample.numpy_integers(22, batch, 0, num_classes), 0
    else:
        targets, argnums = sample.numpy_probabilities(22, shape, axis=axes), (0, 1)
    ours = functools.partial(cross_entropy, axis=axis)
    return ours, naive, logits, targets, argnums


def every_case_of_ours():
    """``jax.value_and_grad`` of ours for every case of NAIVE_CASES, all in one jitted program
    (one compilation instead of one per case)."""
    cases = [naive_case(*case) for case in NAIVE_CASES]

    def all_cases(inputs):
        return [
            jax.value_and_grad(ours, argnums)(logits, targets)
            for (ours, _, _, _, argnums), (logits, targets) in zip(cases, inputs)
        ]

    return jax.jit(all_cases)([(case[2], case[3]) for case in cases])


@functools.cache
def naive_results():
    """The naive composition's value and gradients of every case of NAIVE_CASES."""
    results = []
    for case in NAIVE_CASES:
        _, naive, logits, targets, _ = naive_case(*case)
        results.append(naive(logits, targets))
    return results


def assert_matches_naive(case, value, grad, expected_value, expected_grad):
    np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6, err_msg=str(case))
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=str(case))


@pytest.mark.parametrize("shape,axis,kind", EAGER_CASES)
def test_eager_value_and_gradient_match_naive_composition(shape, axis, kind):
    """Called eagerly: values, the logits' gradient and (for probabilities) the targets'
    gradient, for one class axis, tuple axes and probability targets."""
    ours, _, logits, targets, argnums = naive_case(shape, axis, kind)
    logits, targets = jax.device_put((logits, targets))  # as users call it: jax.Arrays
    value, grad = jax.value_and_grad(ours, argnums)(logits, targets)
    expected = naive_results()[NAIVE_CASES.index((shape, axis, kind))]
    assert_matches_naive((shape, axis, kind), value, grad, *expected)


def test_jitted_value_and_gradient_match_naive_composition():
    """Under jit, every case of NAIVE_CASES (one program for all of them)."""
    for case, got, expected in zip(NAIVE_CASES, every_case_of_ours(), naive_results(), strict=True):
        assert_matches_naive(case, *got, *expected)


CLOSED_FORM_SHAPES = [(5, 3), (8, 10), (3, 4, 7)]


def test_gradient_is_the_closed_form_softmax_minus_one_hot():
    """Every shape of CLOSED_FORM_SHAPES, in one program."""
    problems = [
        (*random_problem(1, shape), sample.numpy_uniform(2, shape[:-1]))
        for shape in CLOSED_FORM_SHAPES
    ]

    def grads(problems):
        return [
            jax.grad(lambda z: jnp.sum(g * cross_entropy(z, labels, reduction="none")))(logits)
            for logits, labels, g in problems
        ]

    for shape, grad, (logits, labels, g) in zip(
        CLOSED_FORM_SHAPES, jax.jit(grads)(problems), problems, strict=True
    ):
        expected = reference.closed_form_gradient(logits, labels, g)
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7, err_msg=str(shape))


# jax.value_and_grad(cross_entropy) of (5, 3) float32 logits: one program for the tests
# that use it.
value_and_grad_5_by_3 = jax.jit(jax.value_and_grad(cross_entropy))


def test_mean_divides_each_row_by_n():
    logits, labels = random_problem(3, (5, 3))
    _, grad = value_and_grad_5_by_3(logits, labels)
    np.testing.assert_allclose(
        grad, reference.closed_form_gradient(logits, labels) / 5, rtol=1e-5, atol=1e-8
    )


def test_float64_values_and_gradient_against_numpy():
    with jax.enable_x64(True):
        logits, labels = random_problem(4, (9, 13), dtype=np.float64)
        assert logits.dtype == jnp.float64
        value, grad = jax.jit(jax.value_and_grad(cross_entropy))(logits, labels)
        assert value.dtype == jnp.float64 and grad.dtype == jnp.float64
        np.testing.assert_allclose(value, reference.cross_entropy(logits, labels), rtol=1e-13)
        np.testing.assert_allclose(
            grad, reference.closed_form_gradient(logits, labels) / 9, rtol=1e-12, atol=1e-15
        )


def test_finite_differences_reverse_mode():
    """Reverse mode to the second order against finite differences, as
    ``jax.test_util.check_grads`` checks it (its checks' evaluations in one program)."""
    with jax.enable_x64(True):
        logits, labels = random_problem(5, (4, 6), dtype=np.float64)
        w = np.linspace(0.5, 2.0, 6)
        f = functools.partial(
            cross_entropy,
            targets=labels,
            label_smoothing=0.1,
            class_weights=w,
            z_loss=1e-2,
            logit_softcap=5.0,
        )
        reference.check_grads_in_one_program(lambda z: f(z), (logits,), order=2, modes=["rev"])


def test_finite_differences_with_probability_targets_both_arguments():
    with jax.enable_x64(True):
        logits, _ = random_problem(6, (3, 5), dtype=np.float64)
        probs = sample.numpy_probabilities(7, (3, 5), np.float64)
        reference.check_grads_in_one_program(
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
OPTION_NAMES = ["+".join(options) or "plain" for options in OPTIONS]
REDUCTIONS = ["mean", "sum", "none"]


def test_options_against_numpy_reference_of_pytorch_semantics():
    """Every option set of OPTIONS with every reduction, all in one program."""
    logits, labels = random_problem(8, (12, 6))

    def every_case(logits, labels, class_weights):
        results = {}
        for name, options in zip(OPTION_NAMES, OPTIONS):
            if "class_weights" in options:  # an array: an argument of the program
                options = dict(options, class_weights=class_weights)
            for reduction in REDUCTIONS:
                results[name, reduction] = cross_entropy(
                    logits, labels, reduction=reduction, **options
                )
        return results

    got = jax.jit(every_case)(logits, labels, OPTIONS[2]["class_weights"])
    for name, options in zip(OPTION_NAMES, OPTIONS):
        for reduction in REDUCTIONS:
            expected = reference.cross_entropy(logits, labels, reduction=reduction, **options)
            np.testing.assert_allclose(
                got[name, reduction], expected, rtol=2e-6, atol=1e-6, err_msg=f"{name} {reduction}"
            )


def documented_formula(z, labels, options):
    """The plain formula of an option set of OPTIONS, for 6 classes."""
    eps = options.get("label_smoothing", 0.0)
    w = jnp.asarray(options.get("class_weights", np.ones(6, np.float32)))
    ignore = options.get("ignore_index")
    beta = options.get("z_loss", 0.0)
    cap = options.get("logit_softcap")
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


def test_option_gradients_match_autodiff_of_the_documented_formula():
    """The derived rule with every option set of OPTIONS equals jax.grad of the plain
    formula (both in one program)."""
    logits, labels = random_problem(9, (10, 6))
    got, want = jax.jit(
        lambda z: (
            [jax.grad(lambda z: cross_entropy(z, labels, **o))(z) for o in OPTIONS],
            [jax.grad(lambda z: documented_formula(z, labels, o))(z) for o in OPTIONS],
        )
    )(logits)
    for name, g, w in zip(OPTION_NAMES, got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7, err_msg=name)


def test_class_mask_gradients_with_every_option_match_autodiff_of_the_masked_formula():
    """``where`` of the logits' shape (classes taking part) with smoothing, z-loss and a soft
    cap (and without it): masked classes get zero gradient, never ``0 * inf``, even though
    the cap's derivative is evaluated on every class. Both caps and the formula's in one
    program."""
    logits, labels = random_problem(14, (9, 7))
    mask = sample.numpy_bernoulli(15, 0.6, (9, 7))
    mask[np.arange(9), labels] = True  # each label takes part
    eps, beta = 0.2, 1e-2
    caps = (None, 3.0)

    def formula(z, logit_softcap):
        if logit_softcap is not None:
            z = logit_softcap * jnp.tanh(z / logit_softcap)
        z = jnp.where(mask, z, -jnp.inf)
        logp = jax.nn.log_softmax(z)
        k = jnp.sum(mask, -1, keepdims=True).astype(jnp.float32)
        q = (1 - eps) * jax.nn.one_hot(labels, 7) + jnp.where(mask, eps / k, 0.0)
        per = -jnp.sum(jnp.where(q != 0, q * logp, 0.0), -1)
        return jnp.mean(per + beta * jax.nn.logsumexp(z, axis=-1) ** 2)

    def loss(z, logit_softcap):
        return cross_entropy(
            z, labels, where=mask, label_smoothing=eps, z_loss=beta, logit_softcap=logit_softcap
        )

    got, want = jax.jit(
        lambda z: [
            [jax.value_and_grad(functools.partial(f, logit_softcap=c))(z) for c in caps]
            for f in (loss, formula)
        ]
    )(logits)
    for cap, (value, grad), (want_value, want_grad) in zip(caps, got, want, strict=True):
        np.testing.assert_allclose(value, want_value, rtol=1e-6, err_msg=f"cap {cap}")
        assert np.all(np.isfinite(grad)), cap
        np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-7, err_msg=f"cap {cap}")
        assert np.all(np.asarray(grad)[~mask] == 0), cap


def test_probability_targets_with_weights_and_smoothing_against_numpy():
    logits, _ = random_problem(10, (7, 5))
    probs = sample.numpy_probabilities(11, (7, 5))
    w = np.array([1.0, 0.5, 2.0, 1.0, 3.0], np.float32)
    got = jax.jit(
        lambda z, y, w: {
            r: cross_entropy(z, y, class_weights=w, label_smoothing=0.2, reduction=r)
            for r in REDUCTIONS
        }
    )(logits, probs, w)
    for reduction in REDUCTIONS:
        expected = reference.cross_entropy(
            logits, probs, class_weights=w, label_smoothing=0.2, reduction=reduction
        )
        np.testing.assert_allclose(
            got[reduction], expected, rtol=2e-6, atol=1e-6, err_msg=reduction
        )


def test_probability_target_gradient_is_minus_log_softmax():
    logits, _ = random_problem(12, (4, 5))
    probs = sample.numpy_probabilities(13, (4, 5))
    grad = jax.jit(jax.grad(lambda y: cross_entropy(logits, y, reduction="sum")))(probs)
    np.testing.assert_allclose(grad, -reference.log_softmax(logits)[0], rtol=1e-5, atol=1e-6)


def test_where_per_example_and_per_logit():
    logits, labels = random_problem(14, (6, 5))
    rows = np.array([True, False, True, True, False, True])
    classes = sample.numpy_bernoulli(15, 0.7, (6, 5))
    classes[np.arange(6), labels] = True
    got = jax.jit(
        lambda z, y, rows, classes: [
            cross_entropy(z, y, where=where, reduction="none") for where in (rows, classes)
        ]
    )(logits, labels, rows, classes)
    for kind, where, per in zip(("rows", "classes"), (rows, classes), got, strict=True):
        expected = reference.cross_entropy(logits, labels, where=where, reduction="none")
        np.testing.assert_allclose(per, expected, rtol=1e-6, atol=1e-6, err_msg=kind)


def test_all_ignored_batch_gives_zero_and_zero_gradient():
    logits, _ = random_problem(16, (4, 3))
    labels = np.full((4,), -100, np.int32)
    value, grad = jax.jit(jax.value_and_grad(functools.partial(cross_entropy, ignore_index=-100)))(
        logits, labels
    )
    assert np.asarray(value) == 0.0
    np.testing.assert_array_equal(grad, np.zeros(logits.shape, np.float32))


def test_fully_masked_rows_give_zero_loss_and_finite_zero_gradient():
    logits, labels = random_problem(17, (3, 4))
    where = np.array([[True] * 4, [False] * 4, [True, False, True, True]])

    def loss_grad_and_rows(z):
        loss, grad = jax.value_and_grad(
            lambda z: cross_entropy(z, labels, where=where, reduction="sum")
        )(z)
        return loss, grad, cross_entropy(z, labels, where=where, reduction="none")

    loss, grad, per = map(np.asarray, jax.jit(loss_grad_and_rows)(logits))
    assert per[1] == 0.0
    np.testing.assert_array_equal(grad[1], np.zeros(4))
    assert np.all(np.isfinite(grad)) and np.isfinite(loss)


def test_label_out_of_range_gives_nan_for_its_row_only():
    logits, _ = random_problem(18, (3, 4))
    labels = np.array([0, 7, 2], np.int32)

    def total(z):
        return jnp.sum(cross_entropy(z, labels, reduction="none"))

    def value_grad_and_rows(z):
        total_value, grad = jax.value_and_grad(total)(z)
        return total_value, grad, cross_entropy(z, labels, reduction="none")

    total_value, grad, per_rows = map(np.asarray, jax.jit(value_grad_and_rows)(logits))
    assert np.isnan(per_rows[1]) and np.all(np.isfinite(per_rows[[0, 2]]))
    assert np.all(np.isnan(grad[1])) and np.all(np.isfinite(grad[0]))
    assert np.isnan(total_value)


def test_docstring_formula_seeds_case():
    """The seeds' network output: 5 examples, 3 classes, L = -(1/N) sum y . log(yhat)."""
    logits, labels = random_problem(19, (5, 3))
    yhat = np.exp(reference.log_softmax(logits)[0])
    y = np.eye(3)[labels]
    expected = -np.mean(np.sum(y * np.log(yhat), -1))
    value, grad = value_and_grad_5_by_3(logits, labels)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(grad, (yhat - y) / 5, rtol=1e-5, atol=1e-8)


DTYPE_SHAPES = [((6, 7), -1), ((3, 4, 5), 1)]
DTYPE_TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-3, "float32": 1e-6, "float64": 1e-13}


@pytest.mark.parametrize("x64", [False, True], ids=["half_and_float32", "float64"])
def test_dtypes_against_naive_composition_in_float32_or_float64(x64):
    """Half precision is computed in f32 and rounded once; f64 stays f64 under x64. Every
    (dtype, shape) of one x64 setting and their references in one program."""
    dtypes = ["float64"] if x64 else ["bfloat16", "float16", "float32"]
    reference_dtype = jnp.float64 if x64 else jnp.float32
    with jax.enable_x64(x64):
        cases = [(dtype, shape, axis) for dtype in dtypes for shape, axis in DTYPE_SHAPES]
        inputs = [random_problem(20, shape, axis, dtype=jnp.dtype(d)) for d, shape, axis in cases]

        def ours(inputs):
            return [
                jax.value_and_grad(functools.partial(cross_entropy, axis=axis))(z, y)
                for (_, _, axis), (z, y) in zip(cases, inputs)
            ]

        def naive(inputs):
            return [
                jax.value_and_grad(functools.partial(naive_loss, axis=axis))(
                    z.astype(reference_dtype), y
                )
                for (_, _, axis), (z, y) in zip(cases, inputs)
            ]

        got, want = jax.jit(lambda inputs: (ours(inputs), naive(inputs)))(inputs)
    for case, (logits, _), (value, grad), (expected_value, expected_grad) in zip(
        cases, inputs, got, want, strict=True
    ):
        assert value.dtype == logits.dtype and grad.dtype == logits.dtype, case
        tolerance = DTYPE_TOLERANCE[case[0]]
        np.testing.assert_allclose(
            np.asarray(value, np.float64), expected_value, rtol=tolerance, err_msg=str(case)
        )
        np.testing.assert_allclose(
            np.asarray(grad, np.float64),
            expected_grad,
            rtol=tolerance,
            atol=tolerance * 1e-2,
            err_msg=str(case),
        )


def test_pytorch_s_padding_label_is_ignored_by_default():
    """``ignore_index=-100`` is the default of the PyTorch-style losses, as in PyTorch's
    ``cross_entropy``: a padded label drops its row (not NaN); None counts every row, and
    the optax drop-ins keep optax's behaviour (no ignored label)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [0.0, 0.0, 0.0]])
    labels = jnp.array([0, -100, 2])
    kept = np.array([0, 2])
    log_p = np.log(np.exp(np.float64(logits)) / np.exp(np.float64(logits)).sum(-1, keepdims=True))
    expected = -log_p[kept, np.array([0, 2])].mean()
    np.testing.assert_allclose(jaxsoftmax.cross_entropy(logits, labels), expected, rtol=1e-6)
    sharded = jaxsoftmax.sharded_cross_entropy(logits, labels, mesh=mesh, class_axis_name="vocab")
    np.testing.assert_allclose(sharded, expected, rtol=1e-6)
    hidden, classifier = jnp.eye(3), logits.T  # h W^T = the logits
    np.testing.assert_allclose(
        jaxsoftmax.linear_cross_entropy(hidden, classifier, labels), expected, rtol=1e-6
    )
    grad = jax.grad(jaxsoftmax.cross_entropy)(logits, labels)
    np.testing.assert_array_equal(grad[1], 0.0)
    assert np.isnan(jaxsoftmax.cross_entropy(logits, labels, ignore_index=None))
    assert np.isnan(jaxsoftmax.softmax_cross_entropy_with_integer_labels(logits, labels)[1])
    probabilities = jax.nn.softmax(logits)  # the default does not apply to probabilities
    np.testing.assert_allclose(
        jaxsoftmax.cross_entropy(logits, probabilities),
        -(np.exp(log_p) * log_p).sum(-1).mean(),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="ignore_index applies to integer class-index"):
        jaxsoftmax.cross_entropy(logits, probabilities, ignore_index=0)

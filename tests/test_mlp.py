"""jaxsoftmax.mlp against NumPy float64, jax.grad of the naive composition and finite differences.

Each test compiles one program (its cases computed together under one ``jax.jit``, each then
compared on its own, the failure naming the case): the properties are about the values, and an
eager call would compile one program per operation and shape. Inputs are drawn with NumPy
(tests/sample.py) and references computed in NumPy, which compile nothing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import sample
from jax.flatten_util import ravel_pytree

from jaxsoftmax import mlp


def numpy_forward(params, x, activation):
    f = {"relu": lambda z: np.maximum(z, 0.0), "tanh": np.tanh}[activation]
    h = np.asarray(x, np.float64)
    for layer in params[:-1]:
        h = f(h @ np.asarray(layer["W"], np.float64) + np.asarray(layer["b"], np.float64))
    return h @ np.asarray(params[-1]["W"], np.float64) + np.asarray(params[-1]["b"], np.float64)


def numpy_loss(params, x, labels, activation, l2):
    scores = numpy_forward(params, x, activation)
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    data_loss = -np.mean(log_softmax[np.arange(len(labels)), labels])
    return data_loss + 0.5 * l2 * sum(np.sum(np.asarray(p["W"], np.float64) ** 2) for p in params)


def naive_loss(params, x, labels, activation, l2):
    """-mean sum y log(softmax(z)) written out, differentiated by plain autodiff."""
    f = {"relu": jax.nn.relu, "tanh": jnp.tanh}[activation]
    h = x
    for layer in params[:-1]:
        h = f(h @ layer["W"] + layer["b"][None, :])
    scores = h @ params[-1]["W"] + params[-1]["b"][None, :]
    softmax = jnp.exp(scores) / jnp.sum(jnp.exp(scores), axis=1, keepdims=True)
    y = jax.nn.one_hot(labels, scores.shape[1], dtype=scores.dtype)
    penalty = sum(jnp.sum(p["W"] ** 2) for p in params)
    return -jnp.mean(jnp.sum(y * jnp.log(softmax), axis=1)) + 0.5 * l2 * penalty


def normal(seed, shape, dtype, scale):
    """As ``sample.normal``, but a NumPy array: ``jnp.asarray`` compiles a program per shape,
    and the arrays go to one jitted function as its arguments anyway."""
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def random_problem(sizes, num_examples, seed=0, dtype=np.float32, bias_scale=0.1):
    """Glorot-scaled weights, biases of ``bias_scale``, inputs and integer labels: NumPy arrays
    drawn with NumPy (``labels`` of NumPy's default int, int64: JAX's default int under x64)."""
    k = sample.split(seed, 2 * len(sizes))
    params = [
        {
            "W": normal(k[2 * i], (fan_in, fan_out), dtype, np.sqrt(2 / (fan_in + fan_out))),
            "b": normal(k[2 * i + 1], (fan_out,), dtype, bias_scale),
        }
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]))
    ]
    x = normal(k[-2], (num_examples, sizes[0]), dtype, 1.0)
    labels = np.random.default_rng(k[-1]).integers(0, sizes[-1], (num_examples,))
    return params, x, labels


def jitted(function, *args):
    """``jax.jit(function)(*args)`` with every output leaf fetched as a NumPy array (indexing
    a JAX array outside jit compiles a program of its own)."""
    return jax.tree_util.tree_map(np.asarray, jax.jit(function)(*args))


def assert_trees_close(got, expected, case, **tolerances):
    got_leaves, expected_leaves = (
        jax.tree_util.tree_leaves(got),
        jax.tree_util.tree_leaves(expected),
    )
    assert len(got_leaves) == len(expected_leaves), case
    for i, (a, b) in enumerate(zip(got_leaves, expected_leaves)):
        np.testing.assert_allclose(a, b, err_msg=f"{case}, leaf {i}", **tolerances)


INIT_SIZES = ([4, 10, 3], [2, 3], [3, 5, 6, 2])
INIT_SCHEMES = ("normal", "he", "glorot")


@functools.cache
def initialized():
    """The draws of TestInit's ``mlp.init`` calls, in one program (NumPy arrays)."""

    def draws():
        return {
            # the biases alone: the program leaves out these weights' draws (their shapes
            # are read from jax.eval_shape, which traces the same code)
            "biases": [
                [layer["b"] for layer in mlp.init(jax.random.key(0), sizes)] for sizes in INIT_SIZES
            ],
            # one draw, scaled three ways
            "statistics": {
                scheme: mlp.init(jax.random.key(1), [200, 300], scheme=scheme)[0]["W"]
                for scheme in INIT_SCHEMES
            },
            # two calls with the same key: equal unless init draws from anything but the key
            "same_key": [mlp.init(jax.random.key(3), [50, 50, 50]) for _ in range(2)],
        }

    return jax.tree_util.tree_map(np.asarray, jax.jit(draws)())


class TestInit:
    @pytest.mark.parametrize("index", range(len(INIT_SIZES)), ids=[str(s) for s in INIT_SIZES])
    def test_shapes_and_zero_biases(self, index):
        sizes = INIT_SIZES[index]
        params = jax.eval_shape(lambda: mlp.init(jax.random.key(0), sizes))
        biases = initialized()["biases"][index]
        assert len(params) == len(biases) == len(sizes) - 1
        for layer, b, (fan_in, fan_out) in zip(params, biases, zip(sizes[:-1], sizes[1:])):
            assert layer["W"].shape == (fan_in, fan_out)
            assert layer["b"].shape == b.shape == (fan_out,)
            assert layer["W"].dtype == layer["b"].dtype == b.dtype == np.float32
            np.testing.assert_array_equal(b, 0.0)

    @pytest.mark.parametrize(
        "scheme, expected_std",
        [("normal", 0.01), ("he", np.sqrt(2 / 200)), ("glorot", np.sqrt(2 / 500))],
    )
    def test_weight_statistics(self, scheme, expected_std):
        weights = initialized()["statistics"][scheme]
        # 60,000 draws: the sample std is within 1% and the mean within 4 standard errors.
        assert abs(weights.std() / expected_std - 1) < 0.01
        assert abs(weights.mean()) < 4 * expected_std / np.sqrt(weights.size)

    def test_layers_are_independent_and_deterministic(self):
        a, b = initialized()["same_key"]
        np.testing.assert_array_equal(a[0]["W"], b[0]["W"])
        np.testing.assert_array_equal(a[1]["W"], b[1]["W"])
        assert not np.allclose(a[0]["W"], a[1]["W"])

    def test_bad_arguments_are_named(self):
        with pytest.raises(ValueError, match=r"sizes=\[4\]"):
            mlp.init(jax.random.key(0), [4])
        with pytest.raises(ValueError, match=r"scheme='xavier'.*'normal', 'he', 'glorot'"):
            mlp.init(jax.random.key(0), [4, 3], scheme="xavier")


def numpy_params(sizes):
    """Parameters of the right shapes as NumPy arrays: for the shape checks, which raise
    before any arithmetic."""
    return [
        {"W": np.ones((i, o), np.float32), "b": np.zeros(o, np.float32)}
        for i, o in zip(sizes[:-1], sizes[1:])
    ]


class TestApply:
    def test_matches_numpy(self):
        params, x, _ = random_problem([4, 10, 7, 3], 5)
        activations = ("relu", "tanh")
        got = jitted(lambda p, x: [mlp.apply(p, x, a) for a in activations], params, x)
        for activation, scores in zip(activations, got):
            np.testing.assert_allclose(
                scores,
                numpy_forward(params, x, activation),
                rtol=1e-5,
                atol=1e-6,
                err_msg=activation,
            )

    def test_single_examples_under_vmap_equal_the_batch(self):
        params, x, _ = random_problem([4, 10, 3], 6)

        def forms(p, x):
            return jax.vmap(mlp.apply, in_axes=(None, 0))(p, x), mlp.apply(p, x), mlp.apply(p, x[2])

        per_example, batch, one = jitted(forms, params, x)
        np.testing.assert_allclose(per_example, batch, rtol=1e-6, atol=1e-7)
        assert one.shape == (3,)
        np.testing.assert_allclose(one, batch[2], rtol=1e-6)

    def test_wrong_input_width_names_the_layer_and_shapes(self):
        params = numpy_params([4, 10, 3])
        with pytest.raises(ValueError, match=r"layer 0: W has shape \(4, 10\).*\(5, 3\).*width 3"):
            mlp.apply(params, np.ones((5, 3), np.float32))

    def test_inconsistent_layers_name_the_layer(self):
        params = numpy_params([4, 10, 3])
        params[1]["W"] = np.ones((9, 3), np.float32)
        with pytest.raises(ValueError, match=r"layer 1: W has shape \(9, 3\).*output of layer 0"):
            mlp.apply(params, np.ones((5, 4), np.float32))
        params = numpy_params([4, 10, 3])
        params[0]["b"] = np.ones(3, np.float32)
        with pytest.raises(ValueError, match=r"layer 0: b has shape \(3,\); expected \(10,\)"):
            mlp.apply(params, np.ones((5, 4), np.float32))

    def test_unknown_activation_lists_the_choices(self):
        with pytest.raises(ValueError, match=r"activation='swish'.*'relu'.*'tanh'"):
            mlp.apply(numpy_params([2, 3, 2]), np.ones((1, 2), np.float32), activation="swish")


def l2_of(params, l2):
    return 0.5 * l2 * sum(np.sum(np.asarray(p["W"], np.float64) ** 2) for p in params)


class TestLoss:
    def test_matches_numpy_float64(self):
        params, x, labels = random_problem([4, 10, 3], 7)
        cases = (("relu", 0.0), ("relu", 1e-3), ("tanh", 0.5))
        got = jitted(
            lambda p, x, y: [mlp.loss(p, x, y, l2=l2, activation=a) for a, l2 in cases],
            params,
            x,
            labels,
        )
        for (activation, l2), value in zip(cases, got):
            expected = numpy_loss(params, x, labels, activation, l2)
            np.testing.assert_allclose(value, expected, rtol=2e-6, err_msg=f"{activation}, l2={l2}")

    def test_penalty_covers_weights_not_biases(self):
        params, x, labels = random_problem([4, 10, 3], 5, bias_scale=3.0)
        difference = jitted(
            lambda p, x, y: mlp.loss(p, x, y, l2=0.2) - mlp.loss(p, x, y), params, x, labels
        )
        np.testing.assert_allclose(difference, l2_of(params, 0.2), rtol=1e-5)

    def test_core_loss_options_pass_through(self):
        params, x, labels = random_problem([4, 10, 3], 6)
        weights = np.array([1.0, 2.0, 0.5])
        smoothed, weighted = jitted(
            lambda p, x, y, w: (
                mlp.loss(p, x, y, label_smoothing=0.1),
                mlp.loss(p, x, y, class_weights=w),
            ),
            params,
            x,
            labels,
            weights.astype(np.float32),
        )
        scores = numpy_forward(params, x, "relu")
        log_softmax = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
        smoothed_targets = 0.9 * np.eye(3)[labels] + 0.1 / 3
        expected = -np.mean(np.sum(smoothed_targets * log_softmax, axis=1))
        np.testing.assert_allclose(smoothed, expected, rtol=1e-5, err_msg="label_smoothing")
        nll = -log_softmax[np.arange(6), labels]
        expected = np.sum(weights[labels] * nll) / np.sum(weights[labels])
        np.testing.assert_allclose(weighted, expected, rtol=1e-5, err_msg="class_weights")

    MORE_OPTIONS = {
        "z_loss": {"z_loss": 0.1},
        "logit_softcap": {"logit_softcap": 1.5},
        "ignore_index": {"ignore_index": -100},
        "all_together": {
            "z_loss": 0.05,
            "logit_softcap": 2.0,
            "ignore_index": -100,
            "label_smoothing": 0.1,
            "class_weights": (1.0, 2.0, 0.5),
            "l2": 1e-2,
        },
    }

    def test_more_core_options_pass_through(self):
        params, x, labels = random_problem([4, 10, 3], 8, bias_scale=1.0)
        scores = numpy_forward(params, x, "relu")
        cases = {}
        for name, options in self.MORE_OPTIONS.items():
            case_labels = labels.copy()
            if "ignore_index" in options:
                case_labels[[1, 5]] = options["ignore_index"]
            cases[name] = case_labels

        def losses(p, x, labels_of):
            out = {}
            for name, options in self.MORE_OPTIONS.items():
                if "class_weights" in options:
                    options = {**options, "class_weights": jnp.asarray(options["class_weights"])}
                out[name] = mlp.loss(p, x, labels_of[name], **options)
            return out

        got = jitted(losses, params, x, cases)
        for name, options in self.MORE_OPTIONS.items():
            case_labels = cases[name]
            expected = reference.cross_entropy(
                scores,
                case_labels,
                reduction="mean",
                **{k: v for k, v in options.items() if k != "l2"},
            ) + l2_of(params, options.get("l2", 0.0))
            np.testing.assert_allclose(got[name], expected, rtol=1e-5, err_msg=name)
            plain = reference.cross_entropy(scores, case_labels.clip(0), reduction="mean")
            # the option changes the loss: it is not ignored
            assert abs(expected - plain) > 1e-3, name

    def test_one_example_is_a_batch_of_one(self):
        params, x, labels = random_problem([4, 10, 3], 3)
        one, batch_of_one = jitted(
            lambda p, x, y: (mlp.loss(p, x[1], y[1]), mlp.loss(p, x[1:2], y[1:2])),
            params,
            x,
            labels,
        )
        np.testing.assert_allclose(one, batch_of_one, rtol=1e-6)

    def test_masked_padding_rows_change_neither_value_nor_gradient(self):
        # how training pads a batch that does not split evenly across devices
        params, x, labels = random_problem([4, 10, 3], 5)
        padded_x = np.concatenate([x, np.zeros((3, 4), x.dtype)])
        padded_labels = np.concatenate([labels, np.zeros((3,), labels.dtype)])
        mask = np.arange(8) < 5
        cases = (
            ("l2", lambda w: {"l2": 1e-2}),
            (
                "class_weights, label_smoothing",
                lambda w: {"class_weights": w, "label_smoothing": 0.1},
            ),
        )

        def both(p, x, y, padded_x, padded_y, mask, w):
            value_and_grad = jax.value_and_grad(mlp.loss)
            return [
                (
                    value_and_grad(p, padded_x, padded_y, where=mask, **options(w)),
                    value_and_grad(p, x, y, **options(w)),
                )
                for _, options in cases
            ]

        got = jitted(
            both,
            params,
            x,
            labels,
            padded_x,
            padded_labels,
            mask,
            np.array([1.0, 2.0, 0.5], np.float32),
        )
        for (name, _), (padded, unpadded) in zip(cases, got):
            assert_trees_close(padded, unpadded, name, rtol=1e-6, atol=1e-7)


class TestGradients:
    def test_custom_rule_matches_naive_composition(self):
        params, x, labels = random_problem([4, 10, 3], 5)
        activations = ("relu", "tanh")

        def both(p, x, y):
            return [
                (
                    jax.grad(lambda p: mlp.loss(p, x, y, l2=1e-2, activation=a))(p),
                    jax.grad(naive_loss)(p, x, y, a, 1e-2),
                )
                for a in activations
            ]

        for activation, (got, expected) in zip(activations, jitted(both, params, x, labels)):
            assert_trees_close(got, expected, activation, rtol=1e-5, atol=1e-7)

    def test_matches_central_finite_differences_in_float64(self):
        with jax.enable_x64(True):
            params, x, labels = random_problem([2, 6, 2], 4, dtype=np.float64)

            def analytic_and_numeric(params, eps=1e-6):
                theta, unravel = ravel_pytree(params)

                def loss_of_vector(t):
                    return mlp.loss(unravel(t), x, labels, l2=1e-2, activation="tanh")

                basis = eps * jnp.eye(theta.size, dtype=jnp.float64)
                numeric = (
                    jax.vmap(loss_of_vector)(theta[None, :] + basis)
                    - jax.vmap(loss_of_vector)(theta[None, :] - basis)
                ) / (2 * eps)
                return jax.grad(loss_of_vector)(theta), numeric

            analytic, numeric = jitted(analytic_and_numeric, params)
            assert analytic.dtype == jnp.float64
            np.testing.assert_allclose(analytic, numeric, atol=1e-8, rtol=1e-5)

    def test_per_example_grads_match_a_loop_and_average_to_the_batch_gradient(self):
        params, x, labels = random_problem([4, 10, 3], 6)
        options = {"l2": 1e-2, "activation": "tanh"}

        def all_three(p, x, y):
            single = jax.grad(lambda p, xi, yi: mlp.loss(p, xi, yi, **options))
            return (
                mlp.per_example_grads(p, x, y, **options),
                jax.lax.map(lambda example: single(p, *example), (x, y)),  # one at a time
                jax.grad(lambda p: mlp.loss(p, x, y, **options))(p),
            )

        per_example, singles, batch = jitted(all_three, params, x, labels)
        for n in range(6):
            example_n = jax.tree_util.tree_map(lambda a: a[n], per_example)
            single = jax.tree_util.tree_map(lambda a: a[n], singles)
            assert_trees_close(example_n, single, f"example {n}", rtol=1e-5, atol=1e-7)
        mean = jax.tree_util.tree_map(
            lambda a: np.mean(np.asarray(a, np.float64), axis=0), per_example
        )
        assert_trees_close(mean, batch, "mean over examples", rtol=1e-5, atol=1e-7)

    def test_per_example_grads_split_where_per_example(self):
        # a masked example contributes no data term: its gradient is the penalty's l2 * W alone
        params, x, labels = random_problem([4, 10, 3], 6)
        where = np.array([True, False, True, True, False, True])
        options = {"l2": 1e-2, "activation": "tanh"}

        def both(p, x, y, w):
            unmasked = jax.grad(lambda p, xi, yi: mlp.loss(p, xi, yi, **options))
            return (
                mlp.per_example_grads(p, x, y, where=w, **options),
                # each example as a batch of one, one at a time
                jax.lax.map(lambda example: unmasked(p, *example), (x[:, None], y[:, None])),
            )

        per_example, unmasked = jitted(both, params, x, labels, where)
        penalty_only = [
            {"W": 1e-2 * np.asarray(p["W"]), "b": np.zeros(p["b"].shape)} for p in params
        ]
        for n in range(6):
            expected = (
                jax.tree_util.tree_map(lambda a: a[n], unmasked) if where[n] else penalty_only
            )
            example_n = jax.tree_util.tree_map(lambda a: a[n], per_example)
            assert_trees_close(
                example_n, expected, f"example {n}, where={where[n]}", rtol=1e-5, atol=1e-7
            )


def test_predict_and_accuracy():
    params = [
        {"W": np.array([[1.0, -1.0, 0.0]], np.float32), "b": np.array([0.0, 0.0, 0.5], np.float32)}
    ]
    x = np.array([[2.0], [-2.0], [0.1]], np.float32)
    predicted, accuracy = jitted(
        lambda p, x, y: (mlp.predict(p, x), mlp.accuracy(p, x, y)),
        params,
        x,
        np.array([0, 1, 0], np.int32),
    )
    np.testing.assert_array_equal(predicted, [0, 1, 2])
    assert float(accuracy) == pytest.approx(2 / 3)

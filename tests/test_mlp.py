"""jaxsoftmax.mlp against NumPy float64, jax.grad of the naive composition and finite differences."""

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


def random_problem(sizes, num_examples, seed=0, dtype=jnp.float32, bias_scale=0.1):
    params = mlp.init(jax.random.key(seed), sizes, scheme="glorot", dtype=dtype)
    k = sample.split(seed, len(params) + 2)
    params = [
        {"W": p["W"], "b": sample.normal(k[2 + i], p["b"].shape, dtype, scale=bias_scale)}
        for i, p in enumerate(params)
    ]
    x = sample.normal(k[0], (num_examples, sizes[0]), dtype)
    # JAX's default int: int64 under x64
    labels = sample.integers(k[1], (num_examples,), 0, sizes[-1], dtype=int)
    return params, x, labels


class TestInit:
    @pytest.mark.parametrize("sizes", [[4, 10, 3], [2, 3], [3, 5, 6, 2]])
    def test_shapes_and_zero_biases(self, sizes):
        params = mlp.init(jax.random.key(0), sizes)
        assert len(params) == len(sizes) - 1
        for layer, (fan_in, fan_out) in zip(params, zip(sizes[:-1], sizes[1:])):
            assert layer["W"].shape == (fan_in, fan_out)
            assert layer["b"].shape == (fan_out,)
            assert layer["W"].dtype == jnp.float32
            np.testing.assert_array_equal(layer["b"], 0.0)

    @pytest.mark.parametrize(
        "scheme, expected_std",
        [("normal", 0.01), ("he", np.sqrt(2 / 200)), ("glorot", np.sqrt(2 / 500))],
    )
    def test_weight_statistics(self, scheme, expected_std):
        weights = np.asarray(mlp.init(jax.random.key(1), [200, 300], scheme=scheme)[0]["W"])
        # 60,000 draws: the sample std is within 1% and the mean within 4 standard errors.
        assert abs(weights.std() / expected_std - 1) < 0.01
        assert abs(weights.mean()) < 4 * expected_std / np.sqrt(weights.size)

    def test_layers_are_independent_and_deterministic(self):
        a = mlp.init(jax.random.key(3), [50, 50, 50])
        b = mlp.init(jax.random.key(3), [50, 50, 50])
        np.testing.assert_array_equal(a[0]["W"], b[0]["W"])
        assert not np.allclose(a[0]["W"], a[1]["W"])

    def test_bad_arguments_are_named(self):
        with pytest.raises(ValueError, match=r"sizes=\[4\]"):
            mlp.init(jax.random.key(0), [4])
        with pytest.raises(ValueError, match=r"scheme='xavier'.*'normal', 'he', 'glorot'"):
            mlp.init(jax.random.key(0), [4, 3], scheme="xavier")


class TestApply:
    @pytest.mark.parametrize("activation", ["relu", "tanh"])
    def test_matches_numpy(self, activation):
        params, x, _ = random_problem([4, 10, 7, 3], 5)
        got = jax.jit(mlp.apply, static_argnums=2)(params, x, activation)
        np.testing.assert_allclose(got, numpy_forward(params, x, activation), rtol=1e-5, atol=1e-6)

    def test_single_examples_under_vmap_equal_the_batch(self):
        params, x, _ = random_problem([4, 10, 3], 6)
        per_example = jax.vmap(mlp.apply, in_axes=(None, 0))(params, x)
        np.testing.assert_allclose(per_example, mlp.apply(params, x), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(mlp.apply(params, x[2]), mlp.apply(params, x)[2], rtol=1e-6)

    def test_wrong_input_width_names_the_layer_and_shapes(self):
        params = mlp.init(jax.random.key(0), [4, 10, 3])
        with pytest.raises(ValueError, match=r"layer 0: W has shape \(4, 10\).*\(5, 3\).*width 3"):
            mlp.apply(params, jnp.ones((5, 3)))

    def test_inconsistent_layers_name_the_layer(self):
        params = mlp.init(jax.random.key(0), [4, 10, 3])
        params[1]["W"] = jnp.ones((9, 3))
        with pytest.raises(ValueError, match=r"layer 1: W has shape \(9, 3\).*output of layer 0"):
            mlp.apply(params, jnp.ones((5, 4)))
        params = mlp.init(jax.random.key(0), [4, 10, 3])
        params[0]["b"] = jnp.ones(3)
        with pytest.raises(ValueError, match=r"layer 0: b has shape \(3,\); expected \(10,\)"):
            mlp.apply(params, jnp.ones((5, 4)))

    def test_unknown_activation_lists_the_choices(self):
        params = mlp.init(jax.random.key(0), [2, 3, 2])
        with pytest.raises(ValueError, match=r"activation='swish'.*'relu'.*'tanh'"):
            mlp.apply(params, jnp.ones((1, 2)), activation="swish")


class TestLoss:
    @pytest.mark.parametrize("activation, l2", [("relu", 0.0), ("relu", 1e-3), ("tanh", 0.5)])
    def test_matches_numpy_float64(self, activation, l2):
        params, x, labels = random_problem([4, 10, 3], 7)
        got = jax.jit(lambda p: mlp.loss(p, x, labels, l2=l2, activation=activation))(params)
        expected = numpy_loss(params, x, labels, activation, l2)
        np.testing.assert_allclose(got, expected, rtol=2e-6)

    def test_penalty_covers_weights_not_biases(self):
        params, x, labels = random_problem([4, 10, 3], 5, bias_scale=3.0)
        difference = mlp.loss(params, x, labels, l2=0.2) - mlp.loss(params, x, labels)
        weights_only = 0.5 * 0.2 * sum(np.sum(np.asarray(p["W"], np.float64) ** 2) for p in params)
        np.testing.assert_allclose(difference, weights_only, rtol=1e-5)

    def test_core_loss_options_pass_through(self):
        params, x, labels = random_problem([4, 10, 3], 6)
        scores = numpy_forward(params, x, "relu")
        log_softmax = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
        smoothed = 0.9 * np.eye(3)[labels] + 0.1 / 3
        expected = -np.mean(np.sum(smoothed * log_softmax, axis=1))
        np.testing.assert_allclose(
            mlp.loss(params, x, labels, label_smoothing=0.1), expected, rtol=1e-5
        )
        weights = np.array([1.0, 2.0, 0.5])
        nll = -log_softmax[np.arange(6), labels]
        weighted = np.sum(weights[labels] * nll) / np.sum(weights[labels])
        np.testing.assert_allclose(
            mlp.loss(params, x, labels, class_weights=jnp.asarray(weights, jnp.float32)),
            weighted,
            rtol=1e-5,
        )

    @pytest.mark.parametrize(
        "options",
        [
            {"z_loss": 0.1},
            {"logit_softcap": 1.5},
            {"ignore_index": -100},
            {
                "z_loss": 0.05,
                "logit_softcap": 2.0,
                "ignore_index": -100,
                "label_smoothing": 0.1,
                "class_weights": (1.0, 2.0, 0.5),
                "l2": 1e-2,
            },
        ],
        ids=["z_loss", "logit_softcap", "ignore_index", "all_together"],
    )
    def test_more_core_options_pass_through(self, options):
        params, x, labels = random_problem([4, 10, 3], 8, bias_scale=1.0)
        if "ignore_index" in options:
            labels = labels.at[jnp.array([1, 5])].set(options["ignore_index"])
        l2 = options.get("l2", 0.0)
        expected = reference.cross_entropy(
            numpy_forward(params, x, "relu"),
            np.asarray(labels),
            reduction="mean",
            **{k: v for k, v in options.items() if k != "l2"},
        ) + 0.5 * l2 * sum(np.sum(np.asarray(p["W"], np.float64) ** 2) for p in params)
        if "class_weights" in options:
            options = {**options, "class_weights": jnp.asarray(options["class_weights"])}
        got = jax.jit(lambda p: mlp.loss(p, x, labels, **options))(params)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        plain = reference.cross_entropy(
            numpy_forward(params, x, "relu"), np.asarray(labels).clip(0), reduction="mean"
        )
        assert abs(expected - plain) > 1e-3  # the option changes the loss: it is not ignored

    def test_one_example_is_a_batch_of_one(self):
        params, x, labels = random_problem([4, 10, 3], 3)
        np.testing.assert_allclose(
            mlp.loss(params, x[1], labels[1]), mlp.loss(params, x[1:2], labels[1:2]), rtol=1e-6
        )

    def test_masked_padding_rows_change_neither_value_nor_gradient(self):
        # how training pads a batch that does not split evenly across devices
        params, x, labels = random_problem([4, 10, 3], 5)
        padded_x = jnp.concatenate([x, jnp.zeros((3, 4))])
        padded_labels = jnp.concatenate([labels, jnp.zeros((3,), labels.dtype)])
        mask = jnp.arange(8) < 5
        weights = jnp.array([1.0, 2.0, 0.5])
        for options in ({"l2": 1e-2}, {"class_weights": weights, "label_smoothing": 0.1}):
            got = jax.value_and_grad(mlp.loss)(
                params, padded_x, padded_labels, where=mask, **options
            )
            expected = jax.value_and_grad(mlp.loss)(params, x, labels, **options)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class TestGradients:
    @pytest.mark.parametrize("activation", ["relu", "tanh"])
    def test_custom_rule_matches_naive_composition(self, activation):
        params, x, labels = random_problem([4, 10, 3], 5)
        got = jax.jit(jax.grad(lambda p: mlp.loss(p, x, labels, l2=1e-2, activation=activation)))(
            params
        )
        expected = jax.jit(jax.grad(naive_loss), static_argnums=3)(
            params, x, labels, activation, 1e-2
        )
        for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)

    def test_matches_central_finite_differences_in_float64(self):
        with jax.enable_x64(True):
            params, x, labels = random_problem([2, 6, 2], 4, dtype=jnp.float64)
            theta, unravel = ravel_pytree(params)

            def loss_of_vector(t):
                return mlp.loss(unravel(t), x, labels, l2=1e-2, activation="tanh")

            @jax.jit
            def central_differences(t, eps=1e-6):
                basis = eps * jnp.eye(t.size, dtype=jnp.float64)
                return (
                    jax.vmap(loss_of_vector)(t[None, :] + basis)
                    - jax.vmap(loss_of_vector)(t[None, :] - basis)
                ) / (2 * eps)

            numeric = central_differences(theta)
            analytic = jax.jit(jax.grad(loss_of_vector))(theta)
            assert analytic.dtype == jnp.float64
            np.testing.assert_allclose(analytic, numeric, atol=1e-8, rtol=1e-5)

    def test_per_example_grads_match_a_loop_and_average_to_the_batch_gradient(self):
        params, x, labels = random_problem([4, 10, 3], 6)
        options = {"l2": 1e-2, "activation": "tanh"}
        per_example = jax.jit(lambda p: mlp.per_example_grads(p, x, labels, **options))(params)
        single_example_grad = jax.jit(jax.grad(lambda p, xi, yi: mlp.loss(p, xi, yi, **options)))
        for n in range(6):
            single = single_example_grad(params, x[n], labels[n])
            for a, b in zip(
                jax.tree_util.tree_leaves(per_example), jax.tree_util.tree_leaves(single)
            ):
                np.testing.assert_allclose(a[n], b, rtol=1e-5, atol=1e-7)
        batch = jax.jit(jax.grad(lambda p: mlp.loss(p, x, labels, **options)))(params)
        for a, b in zip(jax.tree_util.tree_leaves(per_example), jax.tree_util.tree_leaves(batch)):
            np.testing.assert_allclose(jnp.mean(a, axis=0), b, rtol=1e-5, atol=1e-7)

    def test_per_example_grads_split_where_per_example(self):
        # a masked example contributes no data term: its gradient is the penalty's l2 * W alone
        params, x, labels = random_problem([4, 10, 3], 6)
        where = jnp.array([True, False, True, True, False, True])
        options = {"l2": 1e-2, "activation": "tanh"}
        per_example = jax.jit(lambda p, w: mlp.per_example_grads(p, x, labels, where=w, **options))(
            params, where
        )
        unmasked_grad = jax.jit(jax.grad(lambda p, xi, yi: mlp.loss(p, xi, yi, **options)))
        penalty_only = [{"W": 1e-2 * p["W"], "b": jnp.zeros_like(p["b"])} for p in params]
        for n in range(6):
            expected = (
                unmasked_grad(params, x[n : n + 1], labels[n : n + 1]) if where[n] else penalty_only
            )
            for a, b in zip(
                jax.tree_util.tree_leaves(per_example), jax.tree_util.tree_leaves(expected)
            ):
                np.testing.assert_allclose(a[n], b, rtol=1e-5, atol=1e-7)


def test_predict_and_accuracy():
    params = [{"W": jnp.array([[1.0, -1.0, 0.0]]), "b": jnp.array([0.0, 0.0, 0.5])}]
    x = jnp.array([[2.0], [-2.0], [0.1]])
    np.testing.assert_array_equal(mlp.predict(params, x), [0, 1, 2])
    assert float(mlp.accuracy(params, x, jnp.array([0, 1, 0]))) == pytest.approx(2 / 3)

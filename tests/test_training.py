"""jaxsoftmax.training: reaching the target, determinism, resume, checkpoints, non-finite stops."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsoftmax import data, mlp, training

SPIRAL = data.load("spiral", num_examples=50)  # 150 points: small and fast


def assert_params_identical(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_layer_network_reaches_its_target_and_the_linear_model_cannot():
    spiral = data.load("spiral")  # the case study's 300 points and network, 3,000 of 10,000 steps
    config = training.TrainConfig(steps=3000, eval_every=500, checkpoint_every=500)
    result = training.train(config, spiral)
    assert result.train_accuracy >= 0.95
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]
    linear = training.train(training.TrainConfig(hidden=(), steps=300), spiral)
    assert 0.4 <= linear.train_accuracy <= 0.6  # CS231n: 0.49 for the linear classifier


@pytest.mark.parametrize("optimizer, learning_rate", [("momentum", 0.1), ("adam", 0.01)])
def test_other_optimizers_with_minibatches_learn(optimizer, learning_rate):
    config = training.TrainConfig(
        hidden=(30,),
        optimizer=optimizer,
        learning_rate=learning_rate,
        batch_size=32,
        steps=400,
        eval_every=200,
        checkpoint_every=200,
    )
    # optax 0.2.8's adam bias correction mixes a Python float with its int32 step count, which
    # the strict promotion of tests/conftest.py refuses; users run with standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        result = training.train(config, data.load("moons", num_examples=200))
    assert result.train_accuracy >= 0.85
    assert [row["step"] for row in result.history] == [0, 200, 400]


# One configuration, trained once per module (reference_run), for the tests of determinism,
# resume, refused resume and stale temporaries: each run the tests share is one run fewer to
# train (train() keeps the compiled functions of a configuration it has seen; any other field,
# a seed or a length, makes another configuration). Minibatches
# of 32 of SPIRAL's 150 rows, reshuffled each epoch: a resumed run must choose the same ones.
REFERENCE = training.TrainConfig(
    hidden=(16,),
    optimizer="momentum",
    learning_rate=0.1,
    batch_size=32,
    steps=80,
    eval_every=10,
    checkpoint_every=20,
)
# the tests that read the reference run: on one test worker, which trains it once
REFERENCE_RUN = pytest.mark.xdist_group("training_reference_run")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """``(result, checkpoint_dir)``: REFERENCE trained uninterrupted, its checkpoint in a folder
    that the tests only read."""
    checkpoint_dir = str(tmp_path_factory.mktemp("reference") / "whole")
    return training.train(REFERENCE, SPIRAL, checkpoint_dir=checkpoint_dir), checkpoint_dir


@REFERENCE_RUN
def test_same_seed_same_parameters_bit_for_bit(reference_run):
    first = reference_run[0]
    second = training.train(REFERENCE, SPIRAL)  # no checkpoints this time: they change nothing
    assert_params_identical(first.params, second.params)
    assert first.history == second.history
    other = training.train(training.TrainConfig(**{**REFERENCE.__dict__, "seed": 1}), SPIRAL)
    assert not np.array_equal(other.params[0]["W"], first.params[0]["W"])


@functools.cache
def reference_initial_params():
    """``mlp.init`` from ``fold_in(key(3), 0)`` for each scheme, as NumPy arrays: the three in
    one program (one draw, scaled three ways), where eager calls would compile one program per
    operation and shape."""

    def draws():
        key = jax.random.fold_in(jax.random.key(3), 0)
        return {scheme: mlp.init(key, [4, 7, 5, 3], scheme=scheme) for scheme in INIT_SCHEMES}

    return jax.tree_util.tree_map(np.asarray, jax.jit(draws)())


INIT_SCHEMES = ("normal", "he", "glorot")


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_the_initial_state_is_mlp_init_from_the_seed_and_the_optimizer_init(scheme):
    # init_state compiles its draws as a program of their own, unoptimized; mlp.init is the
    # reference (the same draws, up to the last bit of the normal's transform).
    config = training.TrainConfig(hidden=(7, 5), init_scheme=scheme, optimizer="adam", seed=3)
    state, optimizer = training.init_state(config, 4, 3)
    reference = reference_initial_params()[scheme]
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(reference)
    for got, want in zip(
        jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(reference)
    ):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)
    for got, want in zip(
        jax.tree_util.tree_leaves(state.opt_state),
        jax.tree_util.tree_leaves(optimizer.init(state.params)),
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(state.step) == 0
    again, _ = training.init_state(config, 4, 3)
    assert_params_identical(state.params, again.params)
    reseeded, _ = training.init_state(training.TrainConfig(**{**config.__dict__, "seed": 4}), 4, 3)
    assert not np.array_equal(reseeded.params[0]["W"], state.params[0]["W"])


def test_the_initial_state_can_be_traced_by_jit_and_eval_shape():
    # Its own draw compiles with compiler options, which JAX accepts on top-level programs
    # only; inside a trace the draw must join the caller's program instead of raising.
    config = training.TrainConfig(hidden=(7, 5), seed=2)  # init_state's program of the test above
    direct, _ = training.init_state(config, 4, 3)
    shapes = jax.eval_shape(lambda: training.init_state(config, 4, 3)[0])
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), shapes) == jax.tree_util.tree_map(
        lambda a: (a.shape, a.dtype), direct
    )
    traced = jax.jit(lambda: training.init_state(config, 4, 3)[0].params)()
    for got, want in zip(
        jax.tree_util.tree_leaves(traced), jax.tree_util.tree_leaves(direct.params)
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)


def test_each_epoch_visits_every_example_once():
    config = training.TrainConfig(batch_size=30, seed=4)
    # the ten steps' rows in one program (eagerly, each operation would compile its own)
    rows = jax.jit(lambda: [training.batch_indices(config, 150, step) for step in range(10)])()
    rows = [np.asarray(r) for r in rows]
    first_epoch, second_epoch = np.concatenate(rows[:5]), np.concatenate(rows[5:])
    assert sorted(first_epoch.tolist()) == list(range(150))
    assert sorted(second_epoch.tolist()) == list(range(150))
    assert not np.array_equal(first_epoch, second_epoch)  # reshuffled
    assert training.batch_indices(training.TrainConfig(batch_size=None), 150, 0) is None


class _Interrupt(Exception):
    pass


@REFERENCE_RUN
def test_resume_after_an_interruption_is_bit_identical(tmp_path, reference_run):
    uninterrupted = reference_run[0]

    def crash_at_step_50(row, steps_in_run):
        if row["step"] == 50:
            raise _Interrupt  # after the checkpoint of step 40, before the one of step 60

    with pytest.raises(_Interrupt):
        training.train(REFERENCE, SPIRAL, checkpoint_dir=str(tmp_path), on_run_end=crash_at_step_50)
    resumed = training.train(REFERENCE, SPIRAL, checkpoint_dir=str(tmp_path), resume=True)
    assert resumed.resumed_from == 40
    assert_params_identical(resumed.params, uninterrupted.params)
    assert resumed.history == uninterrupted.history


@REFERENCE_RUN
def test_resume_extends_a_finished_run_identically(tmp_path, reference_run):
    longer = reference_run[0]  # REFERENCE's 80 steps in one run
    short = training.TrainConfig(**{**REFERENCE.__dict__, "steps": 40})
    training.train(short, SPIRAL, checkpoint_dir=str(tmp_path))
    extended = training.train(REFERENCE, SPIRAL, checkpoint_dir=str(tmp_path), resume=True)
    assert extended.resumed_from == 40 and extended.steps == 80
    assert_params_identical(extended.params, longer.params)
    assert extended.history == longer.history


@REFERENCE_RUN
def test_resume_refuses_another_configuration(reference_run):
    other = training.TrainConfig(**{**REFERENCE.__dict__, "learning_rate": 0.5})
    with pytest.raises(ValueError, match=r"different configuration.*learning_rate.*\(0.1, 0.5\)"):
        training.train(other, SPIRAL, checkpoint_dir=reference_run[1], resume=True)


@REFERENCE_RUN  # REFERENCE's initial state: the reference run's program
def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    config = REFERENCE
    state, _ = training.init_state(config, SPIRAL.num_features, SPIRAL.num_classes)
    path = str(tmp_path / training.CHECKPOINT_FILENAME)
    training.save_checkpoint(path, state, [{"step": 0}], config, SPIRAL)
    before = (tmp_path / training.CHECKPOINT_FILENAME).read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    moved = state._replace(step=state.step + 10)
    with pytest.raises(OSError, match="disk full"):
        training.save_checkpoint(path, moved, [{"step": 10}], config, SPIRAL)
    monkeypatch.undo()
    assert (tmp_path / training.CHECKPOINT_FILENAME).read_bytes() == before
    assert os.listdir(tmp_path) == [training.CHECKPOINT_FILENAME]  # no temporary file left
    loaded, history = training.load_checkpoint(path, state, config, SPIRAL)
    assert int(loaded.step) == 0 and history == [{"step": 0}]


@REFERENCE_RUN
def test_write_atomically_replaces_the_file_and_a_run_removes_stale_temporaries(
    tmp_path, reference_run
):
    path = tmp_path / "metrics.json"
    training.write_atomically(str(path), "old")
    with open(path) as reader:  # opened before the rewrite: keeps the complete old file
        training.write_atomically(str(path), b"new \xe2\x9c\x93")
        assert reader.read() == "old"
    assert path.read_text(encoding="utf-8") == "new \u2713"
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]

    # what a run killed mid-write leaves: temporaries of the checkpoint and of another file
    for name in (".checkpoint-k1ll3d.tmp", ".checkpoint-x.tmp", ".metrics-x.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    removed = training.remove_stale_temporaries(str(path))
    assert [os.path.basename(p) for p in removed] == [".metrics-x.tmp"]
    # a run resumed where a killed one left its checkpoint (here, a finished run's: nothing is
    # left to compile or train) removes the checkpoint's temporaries first
    checkpoint = os.path.join(reference_run[1], training.CHECKPOINT_FILENAME)
    shutil.copy(checkpoint, tmp_path / training.CHECKPOINT_FILENAME)
    (tmp_path / ".checkpoint-again.tmp").write_bytes(b"partial")
    result = training.train(REFERENCE, SPIRAL, checkpoint_dir=str(tmp_path), resume=True)
    assert result.resumed_from == 80
    assert sorted(os.listdir(tmp_path)) == [training.CHECKPOINT_FILENAME, "metrics.json"]


@REFERENCE_RUN  # REFERENCE's sizes: the reference run's initial parameters' program
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr * l2 = 3 > 2: plain gradient descent multiplies the weights by -2 each step, so the
    # penalty overflows float32 after about 60 steps, long after the checkpoint of step 20.
    config = training.TrainConfig(
        hidden=(16,), l2=3.0, steps=400, eval_every=10, checkpoint_every=20
    )
    with pytest.raises(
        training.NonFiniteLossError, match=r"non-finite at step \d+.*last good checkpoint, step \d+"
    ):
        training.train(config, SPIRAL, checkpoint_dir=str(tmp_path))
    state, _ = training.init_state(config, SPIRAL.num_features, SPIRAL.num_classes)
    saved, history = training.load_checkpoint(
        str(tmp_path / training.CHECKPOINT_FILENAME), state, config, SPIRAL
    )
    assert 20 <= int(saved.step) < 400
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(saved))
    assert np.isfinite(history[-1]["train_loss"])


def sgd_with_an_overflowing_statistic(config):
    """Plain gradient descent plus a float32 state leaf multiplied by 1e4 each step: it overflows
    to inf at step 10 while the updates, the parameters and the loss stay finite, as when a
    squared-gradient moment overflows and only freezes its coordinates."""
    sgd = optax.sgd(config.learning_rate)

    def init(params):
        return sgd.init(params), jnp.ones((), jnp.float32)

    def update(grads, state, params=None):
        updates, sgd_state = sgd.update(grads, state[0], params)
        return updates, (sgd_state, state[1] * jnp.float32(1e4))

    return optax.GradientTransformation(init, update)


@REFERENCE_RUN  # REFERENCE's sizes: the reference run's initial parameters' program
def test_a_non_finite_optimizer_state_stops_the_run_and_is_never_checkpointed(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(training.state, "make_optimizer", sgd_with_an_overflowing_statistic)
    config = training.TrainConfig(hidden=(16,), steps=40, eval_every=5, checkpoint_every=5)
    with pytest.raises(
        training.NonFiniteLossError,
        match=r"optimizer state became non-finite between steps 5 and 10; "
        r"the last good checkpoint, step 5,",
    ):
        training.train(config, SPIRAL, checkpoint_dir=str(tmp_path))
    state, _ = training.init_state(config, SPIRAL.num_features, SPIRAL.num_classes)
    saved, history = training.load_checkpoint(
        str(tmp_path / training.CHECKPOINT_FILENAME), state, config, SPIRAL
    )
    assert int(saved.step) == 5 and saved.opt_state[1] == np.float32(1e20)
    assert [row["step"] for row in history] == [0, 5]


def test_settings_that_do_not_fit_the_data_are_refused_before_anything_runs(tmp_path):
    weights = training.TrainConfig(hidden=(4,), steps=10, eval_every=10, class_weights=(1, 2))
    with pytest.raises(ValueError, match=r"class_weights=\(1.0, 2.0\) holds 2 .* 3 classes"):
        training.train(weights, SPIRAL, checkpoint_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    smoothing = training.TrainConfig(hidden=(4,), steps=10, eval_every=10, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing must be <= 1.0; got 1.5"):
        training.check_config_for_dataset(smoothing, SPIRAL)
    training.check_config_for_dataset(
        training.TrainConfig(hidden=(4,), class_weights=(1, 2, 3)), SPIRAL
    )


def test_the_default_checkpoint_interval_is_a_multiple_of_eval_every():
    assert training.TrainConfig().checkpoint_every == 1000
    assert training.TrainConfig(eval_every=30).checkpoint_every == 1020
    assert training.TrainConfig(eval_every=3000).checkpoint_every == 3000
    assert training.TrainConfig(eval_every=30, checkpoint_every=60).checkpoint_every == 60


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="optimizer='rmsprop'.*sgd, momentum, adam"):
        training.TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="checkpoint_every=150 must be a multiple of eval_every"):
        training.TrainConfig(checkpoint_every=150)
    with pytest.raises(ValueError, match=r"hidden=\(0,\).*hidden=\(\)"):
        training.TrainConfig(hidden=(0,))

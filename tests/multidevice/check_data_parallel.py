"""Data-parallel training on 8 virtual CPU devices equals training on one.

Not collected by the default test run (the name does not start with ``test_``): JAX fixes its
device count when it starts, so ``tests/test_eight_devices.py`` runs this file with pytest in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. To run it by hand::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m pytest -q -p no:cacheprovider tests/multidevice/check_data_parallel.py

The spiral's 150 training points split evenly over 1 and 3 devices but not over 8 (padded with
two masked rows), and a minibatch of 20 splits evenly over 4 but not over 8 (padded to 24).
"""

from __future__ import annotations

import functools
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxsoftmax import data, training

SPIRAL = data.load("spiral", num_examples=50)  # 150 training points
FULL_BATCH = {"hidden": (16,), "steps": 40, "eval_every": 20, "checkpoint_every": 20}
MINIBATCH = {
    "hidden": (16,),
    "optimizer": "momentum",
    "learning_rate": 0.1,
    "batch_size": 20,
    "steps": 40,
    "eval_every": 10,
    "checkpoint_every": 20,
}
# Measured: at most 5e-7 apart after 60 steps. Over thousands of steps the runs drift apart as
# any change of summation order does (experiments/data_parallel.py); here they must not.
RTOL, ATOL = 1e-5, 2e-6


@pytest.fixture(scope="module", autouse=True)
def eight_strict_devices(tmp_path_factory):
    if jax.device_count() != 8:
        pytest.fail(
            f"these checks need 8 devices; got {jax.device_count()}. Run them with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_eight_devices.py "
            "does)."
        )
    # Each train() builds its step, evaluation and initialisation anew, and JAX compiles
    # them anew though the programs of runs on the same device count are the same: the
    # resume test's runs on 8 devices compile the minibatch run's programs again, and the
    # compiled-step test the full-batch run's. JAX's persistent compilation cache, empty at
    # the start and of this module only, loads the repeats (8 of 32 programs; this file's
    # child: 26.5 -> 19 s of CPU).
    cache = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("compilation_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    before = {name: getattr(jax.config, name) for name in cache}
    for name, value in cache.items():
        jax.config.update(name, value)
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield
    for name, value in before.items():
        jax.config.update(name, value)


def train(options, devices, **keywords):
    return training.train(training.TrainConfig(**options, devices=devices), SPIRAL, **keywords)


@functools.cache
def plain_run(name, devices):
    """A run without checkpoints, shared by the tests: the minibatch run on 8 devices is
    both test_every_device_count_matches_one_device's and the resume test's whole run."""
    return train({"full_batch": FULL_BATCH, "minibatch": MINIBATCH}[name], devices)


def assert_same_run(got, expected, *, exact=False):
    for a, b in zip(
        jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(expected.params)
    ):
        if exact:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)
    assert [row["step"] for row in got.history] == [row["step"] for row in expected.history]
    for key in ("batch_loss", "train_loss", "test_loss", "train_accuracy", "test_accuracy"):
        np.testing.assert_allclose(
            [row[key] or 0.0 for row in got.history],
            [row[key] or 0.0 for row in expected.history],
            rtol=0 if exact else RTOL,
            atol=0 if exact else ATOL,
        )


@pytest.mark.parametrize("name", ["full_batch", "minibatch"])
def test_every_device_count_matches_one_device(name):
    one = plain_run(name, 1)
    assert one.devices == 1
    for devices in (3, None) if name == "full_batch" else (8,):
        many = plain_run(name, devices)
        assert many.devices == (devices or 8)  # None: all local devices
        assert_same_run(many, one)


def test_the_compiled_step_splits_the_batch_and_all_reduces_the_gradients():
    config = training.TrainConfig(**FULL_BATCH, devices=8)
    mesh = training.make_mesh(8)
    state, optimizer = training.init_state(config, SPIRAL.num_features, SPIRAL.num_classes)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    x, y, where = training.shard_full_batch(SPIRAL.x_train, SPIRAL.y_train, mesh)
    assert x.shape == (152, 2) and int(np.sum(np.asarray(where))) == 150
    assert {shard.data.shape for shard in x.addressable_shards} == {(19, 2)}
    assert len({shard.device for shard in x.addressable_shards}) == 8
    run = training.make_run_of_steps(config, optimizer, mesh)
    # 20 steps: the full-batch run's program on 8 devices (loaded from the cache after it).
    program = run.lower(state, x, y, 20, where).compile().as_text()
    assert "all-reduce(" in program  # the per-device gradient sums meet
    assert "all-gather(" not in program  # the batch is never gathered onto one device
    new_state, _ = run(state, x, y, 20, where)
    assert new_state.params[0]["W"].sharding.is_fully_replicated
    assert len(new_state.params[0]["W"].sharding.device_set) == 8


def test_resume_is_bit_identical_on_8_devices_and_close_on_another_count(tmp_path):
    options = MINIBATCH
    whole = plain_run("minibatch", 8)

    class Interrupt(Exception):
        pass

    def crash_at_step_30(row, steps_in_run):
        if row["step"] == 30:
            raise Interrupt  # after the checkpoint of step 20

    with pytest.raises(Interrupt):
        train(options, 8, checkpoint_dir=str(tmp_path / "cut"), on_run_end=crash_at_step_30)
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "cut" / training.CHECKPOINT_FILENAME, tmp_path / "moved")
    resumed = train(options, 8, checkpoint_dir=str(tmp_path / "cut"), resume=True)
    assert resumed.resumed_from == 20
    assert_same_run(resumed, whole, exact=True)  # the same programs: bit for bit
    # the step-20 checkpoint of 8 devices, finished on 3: the same run up to rounding
    moved = train(options, 3, checkpoint_dir=str(tmp_path / "moved"), resume=True)
    assert moved.resumed_from == 20 and moved.devices == 3
    assert_same_run(moved, whole)


def test_more_devices_than_there_are_is_named():
    with pytest.raises(
        ValueError,
        match=r"devices=9 asks for more devices than this process "
        r"has: 8 local cpu device\(s\)\. Ask for at most 8",
    ):
        train(FULL_BATCH, 9)

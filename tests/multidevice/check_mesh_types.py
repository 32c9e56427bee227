"""The sharded losses on every kind of mesh, eagerly and under ``jit``, with and without
``jax.set_mesh``: value and gradients equal to one device.

Not collected by the default test run (the name does not start with ``test_``): run by
``tests/test_sharded.py`` in a child process with 8 virtual CPU devices (JAX fixes
its device count at start-up); run it by hand with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/multidevice/check_mesh_types.py``.

The matrix: meshes whose axes are ``Explicit`` (``jax.make_mesh``'s default), ``Auto``
(``jax.sharding.Mesh(devices, names)``) or one of each; vocabularies that divide by the
class shards and ones that do not; the batch split over a mesh axis or not; the loss called
eagerly or under ``jit``; inside ``with jax.set_mesh(mesh):`` or not; every pair of these
choices in every combination (``CASES``). Inputs are plain arrays, as a user's first
training step passes them.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsoftmax import (
    cross_entropy,
    linear_cross_entropy,
    sharded_cross_entropy,
    sharded_linear_cross_entropy,
)


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() != 8:
        pytest.fail(
            f"these checks need 8 devices; got {jax.device_count()}. Run them with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharded.py does)."
        )


RTOL, ATOL = 2e-5, 2e-6
N, D = 8, 4
TYPES = {
    "explicit": (AxisType.Explicit, AxisType.Explicit),
    "auto": (AxisType.Auto, AxisType.Auto),
    "mixed": (AxisType.Explicit, AxisType.Auto),  # the batch axis Explicit, the classes Auto
}


@functools.cache
def mesh_of(types):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=TYPES[types])


def problem(vocabulary):
    """New arrays at each call (each test's inputs are its own, made outside any
    ``jax.set_mesh``), drawn with NumPy: the same values at each call."""
    rng = np.random.default_rng(vocabulary)
    logits = jnp.asarray(3 * rng.standard_normal((N, vocabulary)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocabulary, N), jnp.int32)
    hidden = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    classifier = jnp.asarray(rng.standard_normal((vocabulary, D)), jnp.float32)
    return logits, labels, hidden, classifier


OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3)


@functools.cache
def one_device(vocabulary):
    """Value and gradients of both losses on one device: the reference."""
    logits, labels, hidden, classifier = problem(vocabulary)
    plain = jax.value_and_grad(lambda z: cross_entropy(z, labels, **OPTIONS))(logits)
    fused = jax.value_and_grad(
        lambda h, w: linear_cross_entropy(h, w, labels, **OPTIONS), argnums=(0, 1)
    )(hidden, classifier)
    return plain, fused


def sharded_losses(mesh, batch, vocabulary, inputs):
    logits, labels, hidden, classifier = inputs
    names = dict(mesh=mesh, class_axis_name="model", batch_axis_name=batch)
    plain = jax.value_and_grad(lambda z: sharded_cross_entropy(z, labels, **names, **OPTIONS))
    fused = jax.value_and_grad(
        lambda h, w: sharded_linear_cross_entropy(h, w, labels, **names, **OPTIONS),
        argnums=(0, 1),
    )
    return (plain, (logits,)), (fused, (hidden, classifier))


# Every pair of choices, not every combination: for each mesh type, five rows of a covering
# array of the other four two-way choices (vocabulary, batch split, eager or jit, set_mesh),
# in which each pair of them takes all four of its value pairs. So every two choices (the
# mesh type included) meet in every combination: 15 cases, where the full product is 48.
# The rows are turned by one position from one mesh type to the next, so that different
# triples meet too.
PAIRS = [(0, 0, 0, 0), (0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0)]
CHOICES = ((37, 40), (None, "data"), ("eager", "jit"), (False, True))
CASES = [
    (types, *(choice[row[(k + turn) % 4]] for k, choice in enumerate(CHOICES)))
    for turn, types in enumerate(TYPES)
    for row in PAIRS
]


@pytest.mark.parametrize(
    "types, vocabulary, batch, mode, set_mesh",
    CASES,
    ids=[
        f"{t}-V{v}-{'batch' if b else 'no_batch'}-{m}-{'set_mesh' if s else 'no_mesh'}"
        for t, v, b, m, s in CASES
    ],
)
def test_value_and_gradients_equal_one_device(types, vocabulary, batch, mode, set_mesh):
    mesh = mesh_of(types)
    context = jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext()
    want = one_device(vocabulary)
    inputs = problem(vocabulary)
    with context:
        for (fn, args), expected in zip(sharded_losses(mesh, batch, vocabulary, inputs), want):
            fn = jax.jit(fn) if mode == "jit" else fn
            got = fn(*args)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)


def test_the_readme_mesh_example_trains():
    """``jax.make_mesh``'s default mesh, the loss's gradient taken eagerly without
    ``jax.set_mesh``: a user's first training step on it."""
    mesh = jax.make_mesh((8,), ("v",))
    logits, labels, *_ = problem(37)
    f = lambda z: sharded_cross_entropy(z, labels, mesh=mesh, class_axis_name="v")
    want = jax.grad(lambda z: cross_entropy(z, labels))(logits)
    np.testing.assert_allclose(jax.grad(f)(logits), want, rtol=RTOL, atol=ATOL)
    assert jnp.isfinite(f(logits))


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_inputs_laid_out_on_explicit_axes_keep_their_sharding(mode):
    """Arrays the user placed on the mesh's Explicit axes, differentiated under
    ``jax.set_mesh`` as JAX requires for them: the gradients come back sharded like them."""
    mesh = mesh_of("explicit")
    logits, labels, hidden, classifier = problem(40)
    (plain, _), (fused, _) = sharded_losses(mesh, "data", 40, (logits, labels, hidden, classifier))
    want_plain, want_fused = one_device(40)
    with jax.set_mesh(mesh):
        place = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
        z, h, w = place(logits, "data", "model"), place(hidden, "data"), place(classifier, "model")
        run = (lambda f: jax.jit(f)) if mode == "jit" else (lambda f: f)
        got_plain, got_fused = run(plain)(z), run(fused)(h, w)
    for got, want in ((got_plain, want_plain), (got_fused, want_fused)):
        for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(x), rtol=RTOL, atol=ATOL)
    assert got_plain[1].sharding.spec == P("data", "model")
    assert got_fused[1][1].sharding.spec == P("model", None)


def test_a_different_mesh_set_with_set_mesh_is_named():
    mesh, other = mesh_of("explicit"), jax.make_mesh((4, 2), ("data", "model"))
    logits, labels, hidden, classifier = problem(40)
    with jax.set_mesh(other):
        with pytest.raises(ValueError, match="jax.set_mesh holds another mesh"):
            sharded_cross_entropy(logits, labels, mesh=mesh, class_axis_name="model")
        with pytest.raises(ValueError, match="jax.set_mesh holds another mesh"):
            sharded_linear_cross_entropy(
                hidden, classifier, labels, mesh=mesh, class_axis_name="model"
            )

"""The sharded losses on every kind of mesh, eagerly and under ``jit``, with and without
``jax.set_mesh``: value and gradients equal to one device.

Not collected by the default test run (the name does not start with ``test_``): run by
``tests/test_eight_devices.py`` in a child process with 8 virtual CPU devices (JAX fixes
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
import importlib.util
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsoftmax import sharded_cross_entropy, sharded_linear_cross_entropy

_spec = importlib.util.spec_from_file_location(
    "reference", pathlib.Path(__file__).resolve().parents[1] / "reference.py"
)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() != 8:
        pytest.fail(
            f"these checks need 8 devices; got {jax.device_count()}. Run them with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_eight_devices.py does)."
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


def draw(vocabulary):
    """The inputs as NumPy arrays, drawn with NumPy: the same values at each call."""
    rng = np.random.default_rng(vocabulary)
    logits = (3 * rng.standard_normal((N, vocabulary))).astype(np.float32)
    labels = rng.integers(0, vocabulary, N).astype(np.int32)
    hidden = rng.standard_normal((N, D)).astype(np.float32)
    classifier = rng.standard_normal((vocabulary, D)).astype(np.float32)
    return logits, labels, hidden, classifier


def problem(vocabulary):
    """New arrays at each call (each test's inputs are its own, made outside any
    ``jax.set_mesh``), put on the device as NumPy drew them: no program runs to make them."""
    return tuple(jnp.asarray(x) for x in draw(vocabulary))


OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3)


def central_differences(f, *arrays, step=1e-5):
    """The gradient of the float64 function ``f`` in each of ``arrays``: accurate to about
    1e-9 here, far below the tolerances."""
    arrays = [np.array(x, np.float64) for x in arrays]
    grads = []
    for x in arrays:
        grad = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            kept = x[i]
            x[i] = kept + step
            up = f(*arrays)
            x[i] = kept - step
            down = f(*arrays)
            x[i] = kept
            grad[i] = (up - down) / (2 * step)
        grads.append(grad)
    return tuple(grads)


@functools.cache
def one_device(vocabulary):
    """Value and gradients of both losses, and (for the README example) of the plain loss
    without options: the float64 NumPy reference (tests/reference.py; the one-device losses
    match it in tests/test_cross_entropy.py and tests/test_linear_cross_entropy.py), in the
    layout of ``jax.value_and_grad``'s results. No program compiles for it."""
    logits, labels, hidden, classifier = draw(vocabulary)
    plain = lambda z: reference.cross_entropy(z, labels, **OPTIONS)
    fused = lambda h, w: plain(h @ w.T)
    bare = lambda z: reference.cross_entropy(z, labels)
    return (
        (plain(logits), central_differences(plain, logits)[0]),
        (fused(hidden, classifier), central_differences(fused, hidden, classifier)),
        (bare(logits), central_differences(bare, logits)[0]),
    )


def sharded_losses(mesh, batch, vocabulary, inputs):
    logits, labels, hidden, classifier = inputs
    names = dict(mesh=mesh, class_axis_name="model", batch_axis_name=batch)
    plain = jax.value_and_grad(lambda z: sharded_cross_entropy(z, labels, **names, **OPTIONS))
    fused = jax.value_and_grad(
        lambda h, w: sharded_linear_cross_entropy(h, w, labels, **names, **OPTIONS),
        argnums=(0, 1),
    )
    return (plain, (logits,)), (fused, (hidden, classifier))


# Every pair of choices, not every combination: for each mesh type, one eager case (an eager
# call compiles the loss's forward and backward apart, and small programs around them: the
# costly mode) and two under jit, one with jax.set_mesh and one without. Over the nine, every
# two choices (the mesh type included) meet in every combination: each mesh type with each
# value of the four two-way choices, and each two of those in all four value pairs
# (test_the_cases_cover_every_pair checks it). The full product is 48 cases.
CHOICES = ((37, 40), (None, "data"), ("eager", "jit"), (False, True))
CASES = [
    ("explicit", 37, "data", "eager", True),
    ("explicit", 37, None, "jit", True),
    ("explicit", 40, None, "jit", False),
    ("auto", 37, None, "eager", False),
    ("auto", 37, "data", "jit", False),
    ("auto", 40, "data", "jit", True),
    ("mixed", 40, None, "eager", True),
    ("mixed", 37, "data", "jit", True),
    ("mixed", 40, "data", "jit", False),
]


def test_the_cases_cover_every_pair():
    columns = [tuple(TYPES), *CHOICES]
    for a, b in itertools.combinations(range(len(columns)), 2):
        met = {(case[a], case[b]) for case in CASES}
        missing = set(itertools.product(columns[a], columns[b])) - met
        assert not missing, (a, b, missing)
    for types in TYPES:  # one eager case per mesh type; jit with and without set_mesh
        rows = [case for case in CASES if case[0] == types]
        assert [case[3] for case in rows].count("eager") == 1, types
        assert {case[4] for case in rows if case[3] == "jit"} == {False, True}, types


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
    want = one_device(vocabulary)[:2]
    inputs = problem(vocabulary)
    (plain, plain_args), (fused, fused_args) = sharded_losses(mesh, batch, vocabulary, inputs)
    with context:
        if mode == "jit":  # both losses in one program, as a training step might hold them
            both = jax.jit(lambda z, h, w: (plain(z), fused(h, w)))
            got = both(*plain_args, *fused_args)
        else:
            got = plain(*plain_args), fused(*fused_args)
    for loss, result, expected in zip(("plain", "fused"), got, want):
        leaves = jax.tree.leaves(result), jax.tree.leaves(expected)
        for i, (g, w) in enumerate(zip(*leaves)):
            np.testing.assert_allclose(
                np.asarray(g), w, rtol=RTOL, atol=ATOL, err_msg=f"{loss} loss, leaf {i}"
            )


def test_the_readme_mesh_example_trains():
    """``jax.make_mesh``'s default mesh, the loss's gradient taken eagerly without
    ``jax.set_mesh``: a user's first training step on it."""
    mesh = jax.make_mesh((8,), ("v",))
    logits, labels, *_ = problem(37)
    f = lambda z: sharded_cross_entropy(z, labels, mesh=mesh, class_axis_name="v")
    value, grad = jax.value_and_grad(f)(logits)
    want_value, want_grad = one_device(37)[2]
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=RTOL, atol=ATOL)
    assert np.isfinite(float(value))
    np.testing.assert_allclose(float(value), want_value, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_inputs_laid_out_on_explicit_axes_keep_their_sharding(mode):
    """Arrays the user placed on the mesh's Explicit axes, differentiated under
    ``jax.set_mesh`` as JAX requires for them: the gradients come back sharded like them."""
    mesh = mesh_of("explicit")
    logits, labels, hidden, classifier = problem(40)
    (plain, _), (fused, _) = sharded_losses(mesh, "data", 40, (logits, labels, hidden, classifier))
    want_plain, want_fused, _ = one_device(40)
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

"""Vocabulary-parallel cross-entropy on 8 virtual CPU devices.

Not collected by the default test run (the name does not start with ``test_``): it needs
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX starts, so
``tests/test_eight_devices.py`` runs it with pytest in a subprocess. To run it by hand::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m pytest -q -p no:cacheprovider tests/multidevice/check_sharded.py

Every sharded result is compared with the single-device loss (value and gradients, every
option, even and uneven vocabularies): mostly its float64 NumPy reference
(tests/reference.py, which the single-device ``cross_entropy`` is itself tested against;
gradients by central differences), which costs no compilation where the one-device
programs cost as much as the sharded ones. The compiled programs' collectives are read
from their HLO.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsoftmax
from jaxsoftmax import (
    cross_entropy,
    sharded_cross_entropy,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)

_sharded_cross_entropy = sharded_cross_entropy

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "hlo_collectives", _ROOT / "experiments" / "hlo_collectives.py"
)
hlo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hlo)
_spec = importlib.util.spec_from_file_location("reference", _ROOT / "tests" / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

ATOL = RTOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() != 8:
        pytest.fail(
            f"these checks need 8 devices; got {jax.device_count()}. Run them with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_eight_devices.py "
            "does)."
        )


def auto_mesh(shape, names):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devices, names)


LAYOUTS = {
    # name: (mesh shape, mesh axis names, class axis, batch axis)
    "vocab8": ((8,), ("vocab",), "vocab", None),
    "batch2_vocab4": ((2, 4), ("batch", "vocab"), "vocab", "batch"),
}


def make_inputs(num_rows, num_classes, *, probabilities, seed=0):
    """NumPy arrays (``jax.random`` and ``.at[]`` would compile eager programs for every new
    shape): logits, targets, class weights, a row mask and a class mask."""
    rng = np.random.default_rng(seed)
    logits = (3.0 * rng.standard_normal((num_rows, num_classes))).astype(np.float32)
    if probabilities:
        z = 2.0 * rng.standard_normal((num_rows, num_classes))
        p = np.exp(z - z.max(-1, keepdims=True))
        targets = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    else:
        targets = rng.integers(0, num_classes, num_rows).astype(np.int32)
        targets[1] = num_classes - 1  # the last (possibly padded-shard) class
    weights = rng.uniform(0.2, 2.0, num_classes).astype(np.float32)
    row_mask = np.arange(num_rows) % 4 != 2
    class_mask = rng.uniform(size=(num_rows, num_classes)) > 0.3
    class_mask[3] = False  # a row with no class left
    return logits, targets, weights, row_mask, class_mask


def _ignored(targets):
    targets = targets.copy()
    targets[::5] = -100
    return targets


# Each option's choices, and the vocabulary splits: (layout, number of classes), an even
# split, an uneven one, and one where a whole shard holds only padding (13 classes over 8
# shards: 2 per shard, the last shard none). Every case computes reduction="none" (its
# per-row values feed the gradient with a different weight each) and one more reduction.
FACTORS = {
    "targets": ("int", "prob"),
    "label_smoothing": (0.0, 0.15),
    "class_weights": (False, True),
    "ignore_index": (False, True),  # integer targets only
    "where": (None, "row_mask", "class_mask"),
    "z_loss": (0.0, 1e-2),
    "logit_softcap": (None, 3.0),
    "split": (("batch2_vocab4", 64), ("batch2_vocab4", 61), ("vocab8", 13)),
    "reduction": ("mean", "sum"),
}
# Every pair of choices of two factors meets in some case (a covering array of strength
# 2; test_cases_cover_every_pair checks it), not every combination: 10 cases where the
# product of the choices is 1728 (the earlier matrix, each option on its own and all at
# once on each split, had 28). So every option is compared with one device on every split
# and with every other option on and off. The first case is the plain loss.
ROWS = [
    (0, 0, 0, 0, 0, 0, 0, 1, 0),
    (0, 0, 0, 1, 0, 0, 1, 0, 1),
    (1, 1, 1, 0, 2, 1, 0, 0, 0),
    (0, 1, 1, 0, 1, 0, 1, 2, 1),
    (0, 0, 0, 1, 1, 1, 0, 1, 0),
    (1, 0, 0, 0, 2, 0, 1, 1, 1),
    (1, 0, 1, 0, 0, 1, 0, 2, 0),
    (0, 1, 0, 1, 2, 1, 1, 2, 1),
    (0, 1, 1, 1, 0, 0, 1, 1, 0),
    (1, 0, 1, 0, 1, 0, 0, 0, 1),
]
CASES = [dict(zip(FACTORS, (FACTORS[f][i] for f, i in zip(FACTORS, row)))) for row in ROWS]


def case_id(case):
    on = [case["targets"]]
    on += [name for name in ("label_smoothing", "class_weights", "ignore_index") if case[name]]
    on += [case["where"]] if case["where"] else []
    on += [name for name in ("z_loss", "logit_softcap") if case[name]]
    layout, num_classes = case["split"]
    return "-".join([*on, layout, f"V{num_classes}", case["reduction"]])


def test_cases_cover_every_pair():
    """No compilation: CASES meets every pair of choices of every two factors (but integer
    targets only for ignore_index)."""
    names = list(FACTORS)
    for i, j in itertools.combinations(range(len(names)), 2):
        for a, b in itertools.product(range(len(FACTORS[names[i]])), range(len(FACTORS[names[j]]))):
            if {names[i], names[j]} == {"targets", "ignore_index"} and a == b == 1:
                assert not any(row[0] == 1 and row[3] == 1 for row in ROWS)
                continue
            assert any(row[i] == a and row[j] == b for row in ROWS), (names[i], a, names[j], b)


def loss_arguments(case, num_rows=16, dtype=np.float32):
    """(logits, targets, options) of one case, drawn with NumPy."""
    layout, num_classes = case["split"]
    probabilities = case["targets"] == "prob"
    logits, targets, weights, row_mask, class_mask = make_inputs(
        num_rows, num_classes, probabilities=probabilities
    )
    options = {}
    for name in ("label_smoothing", "z_loss", "logit_softcap"):
        if case[name]:
            options[name] = case[name]
    if case["class_weights"]:
        options["class_weights"] = weights
    if case["ignore_index"]:
        options["ignore_index"] = -100
        targets = _ignored(targets)
    if case["where"]:
        options["where"] = row_mask if case["where"] == "row_mask" else class_mask
    # NumPy: a JAX array that a program splits over the mesh compiles slicing programs.
    logits = logits.astype(dtype)
    targets = targets.astype(dtype) if probabilities else targets
    return logits, targets, options


def reference_values_and_grads(case, logits, targets, options, cotangent):
    """The float64 NumPy reference (tests/reference.py, the documented semantics, which the
    single-device ``cross_entropy`` is itself tested against) of one case: the values of
    "none" and the case's reduction, and the gradients (logits, and probability targets)
    of ``reduction + none . cotangent``, by central differences."""
    reduction = case["reduction"]

    def loss(z, t, name):
        with np.errstate(divide="ignore", invalid="ignore"):  # a row without classes: 0
            return np.asarray(reference.cross_entropy(z, t, reduction=name, **options))

    values = {name: loss(logits, targets, name) for name in ("none", reduction)}
    # "mean" divides by a sum of row weights that no logit moves: row r's share of the
    # objective is none[r] (scale + cotangent[r]).
    scale = values[reduction] / values["none"].sum() if reduction == "mean" else 1.0
    weight = scale + np.asarray(cotangent, np.float64)
    grads = reference.rowwise_gradient(lambda z: loss(z, targets, "none") * weight, logits)
    if case["targets"] == "prob":
        grads = (
            grads,
            reference.rowwise_gradient(lambda t: loss(logits, t, "none") * weight, targets),
        )
    return values, grads


def mesh_axes(layout):
    shape, names, class_axis, batch_axis = LAYOUTS[layout]
    return dict(
        mesh=auto_mesh(shape, names), class_axis_name=class_axis, batch_axis_name=batch_axis
    )


def run_cases(objectives, arguments):
    """Every case's objective in ONE compiled program: its fixed cost of compilation is paid
    once, not once per case. Each case keeps its own inputs, options and objective."""
    every_case = jax.jit(lambda arguments: [f(*a) for f, a in zip(objectives, arguments)])
    return every_case(arguments)


@functools.cache
def sharded_and_reference():
    """``[((values, grads), (ref_values, ref_grads))]``, one per case of CASES: the values
    of reduction "none" and the case's other reduction, and the gradients (logits, and
    probability targets) of one objective that both reductions feed. The sharded losses of
    every case are one program; the references are NumPy (the single-device losses cost
    as much compilation as the sharded ones)."""
    cotangent = np.linspace(0.5, 1.5, 16, dtype=np.float32)

    def objective(loss_fn, reduction, z, t):
        values = {
            "none": loss_fn(z, t, reduction="none"),
            reduction: loss_fn(z, t, reduction=reduction),
        }
        return values[reduction] + jnp.dot(values["none"], cotangent), values

    arguments, sharded, references = [], [], []
    for case in CASES:
        logits, targets, options = loss_arguments(case)
        arguments.append((logits, targets))
        argnums = (0, 1) if case["targets"] == "prob" else 0
        loss_fn = functools.partial(sharded_cross_entropy, **mesh_axes(case["split"][0]))
        total = functools.partial(
            objective, functools.partial(loss_fn, **options), case["reduction"]
        )
        sharded.append(jax.value_and_grad(total, argnums=argnums, has_aux=True))
        references.append(reference_values_and_grads(case, logits, targets, options, cotangent))
    results = [(values, grads) for (_, values), grads in run_cases(sharded, arguments)]
    return list(zip(results, references))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_sharded_equals_single_device(index):
    (values, grads), (ref_values, ref_grads) = sharded_and_reference()[index]
    assert values.keys() == ref_values.keys()
    for name in values:
        got, want = values[name], ref_values[name]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert got.shape == want.shape
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# bf16 logits at V = 61 on the 2 x 4 mesh: plain, smoothing, a class mask, probabilities.
BF16_CASES = {
    name: dict(CASES[0], split=("batch2_vocab4", 61), reduction="mean", **changes)
    for name, changes in {
        "int_plain": {},
        "int_smoothing": dict(label_smoothing=0.2),
        "int_class_mask": dict(where="class_mask", label_smoothing=0.1),
        "prob_plain": dict(targets="prob"),
    }.items()
}


@functools.cache
def bf16_sharded_and_reference():
    """{option: ((value, grads), (ref_value, ref_grads))} for bf16 logits (and bf16
    probability targets): the cases' sharded losses are one program, their references the
    float64 NumPy ones of the bf16 inputs (as for sharded_and_reference)."""
    axes = mesh_axes("batch2_vocab4")
    arguments, sharded, references = [], [], []
    for case in BF16_CASES.values():
        logits, targets, options = loss_arguments(case, dtype=jnp.bfloat16)
        arguments.append((logits, targets))
        argnums = (0, 1) if case["targets"] == "prob" else 0
        loss_fn = functools.partial(sharded_cross_entropy, **axes, **options)
        sharded.append(jax.value_and_grad(loss_fn, argnums=argnums))
        values, grads = reference_values_and_grads(
            dict(case, reduction="mean"), logits, targets, options, np.zeros(len(logits))
        )
        references.append((values["mean"], grads))
    return dict(zip(BF16_CASES, zip(run_cases(sharded, arguments), references)))


@pytest.mark.parametrize("option", BF16_CASES)
def test_bf16_logits_sharded_equal_single_device(option):
    """bf16 logits (and bf16 probability targets): each shard reads its bf16 logits and label
    logit as they are and widens them to float32; the sharded loss and gradients equal the
    single-device ones (the float64 reference of the bf16 inputs) up to the final rounding
    to bf16 (and float32 sums)."""
    (value, grads), (ref_value, ref_grads) = bf16_sharded_and_reference()[option]
    assert value.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(value), ref_value, rtol=1e-2)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-4)


def test_label_smoothing_spreads_over_the_global_classes():
    """With eps, K is all V classes: the per-shard V / S would give a different loss."""
    mesh = auto_mesh((8,), ("vocab",))
    logits, labels, *_ = make_inputs(8, 64, probabilities=False)
    got = jax.jit(
        functools.partial(
            sharded_cross_entropy,
            mesh=mesh,
            class_axis_name="vocab",
            label_smoothing=0.3,
            reduction="none",
        )
    )(logits, labels)
    # The loss by hand in float64 NumPy: (1 - eps) (lse - z_y) + eps mean_c (lse - z_c),
    # the mean over all 64 classes (the 8 classes of one shard would give another value).
    z = np.asarray(logits, np.float64)
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    by_hand = 0.7 * (lse - z[np.arange(8), np.asarray(labels)]) + 0.3 * np.mean(
        lse[:, None] - z, axis=-1
    )
    np.testing.assert_allclose(got, by_hand, rtol=RTOL, atol=ATOL)


def test_bad_labels_are_nan_like_one_device():
    """Labels past V, including those that land in the padding, give NaN; masked ones not."""
    mesh = auto_mesh((2, 4), ("batch", "vocab"))
    logits, labels, _, row_mask, _ = make_inputs(8, 61, probabilities=False)
    labels[[0, 2, 4, 5, 6]] = [61, 63, 64, -3, 62]
    row_mask = np.arange(8) != 6  # the bad label of row 6 is masked out
    got = jax.jit(
        functools.partial(
            sharded_cross_entropy,
            mesh=mesh,
            class_axis_name="vocab",
            batch_axis_name="batch",
            reduction="none",
        )
    )(logits, labels, where=row_mask)
    want = cross_entropy(logits, labels, where=row_mask, reduction="none")
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).tolist() == [True, False, True, False, True, True, False, False]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_checked_raises_on_labels_past_the_real_vocabulary():
    mesh = auto_mesh((8,), ("vocab",))
    logits, labels, *_ = make_inputs(8, 61, probabilities=False)
    loss_fn = jaxsoftmax.checked(
        jax.jit(
            functools.partial(
                sharded_cross_entropy, mesh=mesh, class_axis_name="vocab", checked=True
            )
        )
    )
    np.testing.assert_allclose(
        loss_fn(logits, labels), reference.cross_entropy(logits, labels), rtol=RTOL
    )
    with pytest.raises(Exception, match=r"found label 62 .* 0 <= label < 61"):
        bad = labels.copy()
        bad[3] = 62
        loss_fn(logits, bad)


def test_explicit_mesh_and_several_leading_axes():
    """``jax.make_mesh`` (Explicit axes) and logits [N, T, V] with the batch split."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    rng = np.random.default_rng(3)
    # NumPy: JAX arrays on one device that a program splits compile slicing programs.
    logits = rng.standard_normal((4, 3, 40)).astype(np.float32)
    labels = rng.integers(0, 40, (4, 3)).astype(np.int32)
    loss_fn = functools.partial(
        sharded_cross_entropy,
        mesh=mesh,
        class_axis_name="model",
        batch_axis_name="data",
        label_smoothing=0.1,
    )
    # The value, gradient and per-row losses: one program.
    (got, got_grad), rows = jax.jit(
        lambda z, y: (jax.value_and_grad(loss_fn)(z, y), loss_fn(z, y, reduction="none"))
    )(logits, labels)
    # The float64 reference (tests/reference.py), its gradient by central differences.
    z, y = logits.reshape(12, 40), labels.reshape(12)
    want = reference.cross_entropy(z, y, label_smoothing=0.1)
    want_grad = reference.rowwise_gradient(
        lambda z: reference.cross_entropy(z, y, label_smoothing=0.1, reduction="none") / 12, z
    ).reshape(logits.shape)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(got_grad, want_grad, rtol=RTOL, atol=ATOL)
    assert rows.shape == (4, 3)
    assert rows.sharding.spec[0] == "data"
    # Inputs already laid out on the explicit mesh, under jax.set_mesh (JAX's way to use
    # explicit sharding): the gradient comes back sharded like the logits.
    with jax.set_mesh(mesh):
        placed = jax.device_put(logits, NamedSharding(mesh, P("data", None, "model")))
        placed_labels = jax.device_put(labels, NamedSharding(mesh, P("data")))
        got, got_grad = jax.jit(jax.value_and_grad(loss_fn))(placed, placed_labels)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(got_grad, want_grad, rtol=RTOL, atol=ATOL)
    assert got_grad.sharding.spec == P("data", None, "model")


def test_argument_errors_name_the_fix():
    mesh = auto_mesh((2, 4), ("batch", "vocab"))
    logits, labels, *_ = make_inputs(7, 16, probabilities=False)
    # Argument errors raise while tracing, before anything runs.
    sharded_cross_entropy = jax.jit(
        _sharded_cross_entropy, static_argnames=("mesh", "class_axis_name", "batch_axis_name")
    )
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        sharded_cross_entropy(logits, labels, mesh=mesh, class_axis_name="classes")
    with pytest.raises(ValueError, match="must divide by the 2 shards"):
        sharded_cross_entropy(
            logits, labels, mesh=mesh, class_axis_name="vocab", batch_axis_name="batch"
        )
    with pytest.raises(ValueError, match="different mesh axes"):
        sharded_cross_entropy(
            logits, labels, mesh=mesh, class_axis_name="vocab", batch_axis_name="vocab"
        )
    with pytest.raises(ValueError, match="class_weights"):
        sharded_cross_entropy(
            logits,
            labels,
            mesh=mesh,
            class_axis_name="vocab",
            class_weights=np.ones(15, np.float32),
        )


# The building block: the public losses with axis_name= inside the user's own shard_map.


def test_axis_name_inside_shard_map_with_every_public_loss():
    mesh = auto_mesh((2, 4), ("batch", "vocab"))
    logits, labels, weights, _, _ = make_inputs(8, 32, probabilities=False)
    _, probs, *_ = make_inputs(8, 32, probabilities=True)
    # JAX arrays (no program compiled): the jitted function below closes over them.
    logits, labels, weights, probs = map(jnp.asarray, (logits, labels, weights, probs))
    shard = functools.partial(jax.shard_map, mesh=mesh, out_specs=P("batch"))
    rows, classes = P("batch"), P("batch", "vocab")

    @functools.partial(shard, in_specs=(classes, rows, P("vocab")))
    def general(z, y, w):
        return cross_entropy(
            z,
            y,
            class_weights=w,
            label_smoothing=0.1,
            z_loss=1e-2,
            reduction="none",
            axis_name="vocab",
        )

    @functools.partial(shard, in_specs=(classes, rows))
    def integer(z, y):
        return softmax_cross_entropy_with_integer_labels(z, y, axis_name="vocab")

    @functools.partial(shard, in_specs=(classes, classes))
    def soft(z, y):
        return softmax_cross_entropy(z, y, axis_name="vocab")

    cotangent = np.linspace(-1.0, 2.0, 8, dtype=np.float32)
    tangent = np.random.default_rng(7).standard_normal(logits.shape).astype(np.float32)

    def evaluate(fn, targets, argnums, forward_mode):
        loss, pullback = jax.vjp(fn, logits, targets)
        grads = pullback(jnp.asarray(cotangent))
        out = [loss] + [grads[i] for i in argnums]
        if forward_mode:  # the drop-ins' custom_jvp, under shard_map too
            out.append(jax.jvp(lambda z: fn(z, targets), (logits,), (jnp.asarray(tangent),))[1])
        return out

    def reference_of(options, targets, argnums, forward_mode):
        """One device's: the float64 NumPy reference (tests/reference.py) of the per-row
        losses, the pullback of ``cotangent`` and the pushforward of ``tangent`` by central
        differences (row r's loss reads row r only), as ``evaluate`` returns them."""
        z, t = np.asarray(logits, np.float64), np.asarray(targets)

        def rows(z, t):
            return reference.cross_entropy(z, t, reduction="none", **options)

        c = np.asarray(cotangent, np.float64)
        out = [rows(z, t), reference.rowwise_gradient(lambda z: rows(z, t) * c, z)]
        if 1 in argnums:
            out.append(reference.rowwise_gradient(lambda t: rows(z, t) * c, t))
        if forward_mode:
            ones = reference.rowwise_gradient(lambda z: rows(z, t), z)
            out.append(np.sum(ones * tangent, axis=-1))
        return out

    general_options = dict(class_weights=np.asarray(weights), label_smoothing=0.1, z_loss=1e-2)
    cases = {
        "cross_entropy": (
            lambda z, y: general(z, y, weights),
            general_options,
            labels,
            (0,),
            False,
        ),
        "integer_labels": (integer, {}, labels, (0,), True),
        "soft": (soft, {}, probs, (0, 1), True),
    }
    # Every case, sharded, in one compiled program; one device's in NumPy (float64).
    results = jax.jit(
        lambda: {
            name: evaluate(sharded, targets, argnums, forward_mode)
            for name, (sharded, _, targets, argnums, forward_mode) in cases.items()
        }
    )()
    for name, got in results.items():
        _, options, targets, argnums, forward_mode = cases[name]
        want = reference_of(options, targets, argnums, forward_mode)
        assert len(got) == len(want) == 1 + len(argnums) + forward_mode, name
        for what, a, b in zip(("value", "grad z", "grad targets" if 1 in argnums else "jvp", "jvp"),
                              got, want):  # fmt: skip
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{name} {what}")


# The compiled program: which collectives, on which shapes.

N_ROWS, N_CLASSES = 64, 1024  # per device: 32 rows x 256 classes on the 2 x 4 mesh
ROWS_LOCAL, CLASSES_LOCAL = 32, 256


def compiled_collectives(options, *, grad=True, mesh_shape=(2, 4)):
    """The collectives of the compiled loss (``grad``: value and gradient) and the HLO text.

    Cached: the plain and the smoothing cases of test_collectives_move_per_row_statistics_only
    and of test_backward_adds_no_communication read the same value-and-gradient programs."""
    return _compiled_collectives(tuple(sorted(options.items())), grad, mesh_shape)


@functools.cache
def _compiled_collectives(options, grad, mesh_shape):
    options = dict(options)
    mesh = auto_mesh(mesh_shape, ("batch", "vocab"))

    def placed(shape, spec, dtype=jnp.float32):
        # Shapes and shardings only: nothing is computed before the compilation.
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    logits = placed((N_ROWS, N_CLASSES), P("batch", "vocab"))
    labels = placed((N_ROWS,), P("batch"), jnp.int32)
    if options.pop("probabilities", False):
        labels = placed((N_ROWS, N_CLASSES), P("batch", "vocab"))
    extra = {}
    if options.pop("weights", False):
        extra["class_weights"] = placed((N_CLASSES,), P("vocab"))
    if options.pop("row_mask", False):
        extra["where"] = placed((N_ROWS,), P("batch"), bool)
    if options.pop("class_mask", False):
        extra["where"] = placed((N_ROWS, N_CLASSES), P("batch", "vocab"), bool)

    def loss_fn(z, y, kw):
        return sharded_cross_entropy(
            z, y, mesh=mesh, class_axis_name="vocab", batch_axis_name="batch", **options, **kw
        )

    fn = jax.value_and_grad(loss_fn) if grad else loss_fn
    text = jax.jit(fn).lower(logits, labels, extra).compile().as_text()
    return hlo.collectives(text), text


def assert_per_row_statistics_only(found):
    assert found, "no collective found: the HLO parser or the sharding is broken"
    for op, shapes in found:
        assert op == "all-reduce", f"{op} {shapes}: only all-reduces of row statistics expected"
        for dtype, shape in shapes:
            # [rows, 1] statistics, or the scalars of the mean / a sum of class weights.
            assert hlo.elements(shape) <= ROWS_LOCAL, f"all-reduce of {dtype}{list(shape)}"
            assert CLASSES_LOCAL not in shape


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0),
        dict(weights=True, row_mask=True, label_smoothing=0.1, ignore_index=-100),
    ],
    ids=["plain", "smoothing_zloss_softcap", "weights_mask_ignore"],
)
def test_collectives_move_per_row_statistics_only(options):
    found, _ = compiled_collectives(dict(options))
    assert_per_row_statistics_only(found)
    # The three per-row statistics of the forward (max, sum of exp, label logit) at least.
    rows = [s for op, shapes in found for s in shapes if s[1] == (ROWS_LOCAL, 1)]
    assert len(rows) >= 3


ROW = ("f32", (ROWS_LOCAL, 1))  # one float32 per local row


def all_operands(found):
    return sorted(operand for _, operands in found for operand in operands)


# options: the all-reduce operands the value-and-gradient program has beyond the forward's,
# as docs/scaling.md states them. The rule's backward recomputes sum_c q_c, the factor of
# softmax(z) in dL/dz, instead of saving it: free for integer labels without class weights
# (it is 1), a per-row psum of w[label] with class weights (and with smoothing the psum of
# sum_c w_c: one number, or one per row under a class mask), a per-row sum of q with
# probability targets.
BACKWARD_EXTRAS = {
    "plain": ({}, []),
    "smoothing_zloss_softcap": (dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0), []),
    "row_mask_ignore": (dict(row_mask=True, ignore_index=-100), []),
    "weights": (dict(weights=True), [ROW]),
    "weights_zloss_mask_ignore": (
        dict(weights=True, z_loss=1e-3, row_mask=True, ignore_index=-100),
        [ROW],
    ),
    "weights_smoothing": (dict(weights=True, label_smoothing=0.1), [ROW, ("f32", (1, 1))]),
    "weights_smoothing_class_mask": (
        dict(weights=True, label_smoothing=0.1, class_mask=True),
        [ROW, ROW],
    ),
    "class_mask_smoothing": (dict(class_mask=True, label_smoothing=0.1), []),
    "probabilities": (dict(probabilities=True), [ROW]),
    "probabilities_weights_smoothing": (
        dict(probabilities=True, weights=True, label_smoothing=0.1),
        [ROW],
    ),
}


@pytest.mark.parametrize("case", BACKWARD_EXTRAS)
def test_backward_adds_no_communication(case):
    """Plain integer labels: the value-and-gradient program has exactly the forward's
    collectives. Class weights or probability targets: exactly the documented per-row extras,
    still all-reduces of at most one value per row."""
    options, extras = BACKWARD_EXTRAS[case]
    forward, _ = compiled_collectives(dict(options), grad=False)
    both, _ = compiled_collectives(dict(options), grad=True)
    assert_per_row_statistics_only(both)
    if not extras:
        assert sorted(map(str, both)) == sorted(map(str, forward))
    assert all_operands(both) == sorted(all_operands(forward) + extras)


def test_hlo_check_catches_gathered_logits():
    """Negative control: gathering the logits shows up as an all-gather of [N, V] data."""
    mesh = auto_mesh((2, 4), ("batch", "vocab"))

    # check_vma=False: shard_map cannot tell that the gathered loss is the same on every
    # vocabulary shard; this control only needs the program to compile.
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P("batch", "vocab"), P("batch")),
        out_specs=P("batch"),
        check_vma=False,
    )
    def gathered(z, y):
        z = jax.lax.all_gather(z, "vocab", axis=1, tiled=True)
        return cross_entropy(z, y, reduction="none")

    logits = jax.ShapeDtypeStruct((N_ROWS, N_CLASSES), jnp.float32)
    labels = jax.ShapeDtypeStruct((N_ROWS,), jnp.int32)
    found = hlo.collectives(jax.jit(gathered).lower(logits, labels).compile().as_text())
    assert ("all-gather", [("f32", (ROWS_LOCAL, N_CLASSES))]) in found
    with pytest.raises(AssertionError):
        assert_per_row_statistics_only(found)


def test_gradient_without_vma_typing_pmap_and_check_vma_false():
    """``shard_map(check_vma=False)`` and ``pmap`` hand each shard a share of the cotangent;
    the rule's backward sums the shares (a per-row psum), so gradients still match."""
    mesh = auto_mesh((4,), ("vocab",))
    logits, labels, weights, _, _ = make_inputs(6, 24, probabilities=False)
    _, probs, *_ = make_inputs(6, 24, probabilities=True)
    logits, labels, probs = map(jnp.asarray, (logits, labels, probs))  # closed over below
    options = dict(label_smoothing=0.1, z_loss=1e-2, reduction="sum")
    cases = {"labels": (labels, P(), (0,)), "probabilities": (probs, P(None, "vocab"), (0, 1))}

    def gradients(targets, spec, argnums):
        """shard_map's gradients with check_vma True and False."""
        out = {}
        for check_vma in (True, False):
            loss = jax.shard_map(
                functools.partial(cross_entropy, axis_name="vocab", **options),
                mesh=mesh,
                in_specs=(P(None, "vocab"), spec),
                out_specs=P(),
                check_vma=check_vma,
            )
            out[f"vma={check_vma}"] = jax.grad(loss, argnums=argnums)(logits, targets)
        return out

    def one_device(targets, spec, argnums):
        """The float64 NumPy reference's gradients (tests/reference.py; central differences:
        the "sum" of rows that each read their own row only)."""
        z, t = np.asarray(logits, np.float64), np.asarray(targets)
        ref = dict(options, reduction="none")
        rows = lambda z, t: reference.cross_entropy(z, t, **ref)
        grads = [reference.rowwise_gradient(lambda z: rows(z, t), z)]
        if 1 in argnums:
            grads.append(reference.rowwise_gradient(lambda t: rows(z, t), t))
        return grads

    # Both targets and both shard_maps: one compiled program; one device's in NumPy.
    results = jax.jit(lambda: {name: gradients(*case) for name, case in cases.items()})()
    for name, out in results.items():
        ref = one_device(*cases[name])
        for variant in ("vma=True", "vma=False"):
            got = out[variant]
            assert len(got) == len(ref) == len(cases[name][2])
            for a, b in zip(got, ref):
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{name} {variant}")

    # pmap: the classes split over the mapped axis, every device returns the same loss.
    shards = np.asarray(logits).reshape(6, 4, 6).transpose(1, 0, 2)  # NumPy: no program
    per_device = jax.pmap(
        functools.partial(cross_entropy, axis_name="vocab", **options),
        axis_name="vocab",
        in_axes=(0, None),
        devices=jax.devices()[:4],
    )
    (want,) = one_device(*cases["labels"])
    picks = {"first device": lambda out: out[0], "mean": jnp.mean}
    # Both picks in one program (eagerly, the gradient's every operation compiled alone).
    by_pick = jax.jit(
        lambda s: {n: jax.grad(lambda s: p(per_device(s, labels)))(s) for n, p in picks.items()}
    )(shards)
    for name, got in by_pick.items():
        got = np.asarray(got).transpose(1, 0, 2).reshape(6, 24)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)

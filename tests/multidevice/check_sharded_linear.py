"""The fused linear losses with vocabulary-split classifiers, on 8 virtual CPU devices.

Run by ``tests/test_eight_devices.py`` in the same child pytest as ``check_sharded.py`` (see
there for running it by hand). Every result of ``sharded_linear_cross_entropy`` is compared
with the single-device loss's float64 NumPy reference (tests/reference.py, which the
single-device ``linear_cross_entropy`` is itself tested against; values of every reduction,
gradients for the hidden states, the classifier and the bias, those by central differences
through the logits), and the compiled programs' collectives are read from their HLO.
``sharded_linear_distillation_loss`` is compared with the reference of
``linear_distillation_loss`` the same way, for both models' gradients. References in NumPy:
the one-device programs cost as much compilation as the sharded ones did.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsoftmax import (
    linear_cross_entropy,
    sharded_linear_cross_entropy,
    sharded_linear_distillation_loss,
)
from jaxsoftmax.checks.linear_call import check_linear_call
from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.tiles import cross_entropy as fused

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
N, D = 16, 8
CHUNKS = dict(token_chunk=3, vocab_chunk=5)  # several ragged chunks on every shard


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() != 8:
        pytest.fail(
            f"these checks need 8 devices; got {jax.device_count()}. Run them with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8."
        )


def auto_mesh(shape, names):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devices, names)


MESHES = {
    # name: (mesh shape, mesh axis names, class axis, batch axis)
    "vocab8": ((8,), ("vocab",), "vocab", None),
    "batch2_vocab4": ((2, 4), ("batch", "vocab"), "vocab", "batch"),
}


def numpy_inputs(num_classes, layout="vd", seed=0):
    # Drawn with NumPy: jax.random (and jnp's eager operations on the draws) would compile
    # programs again for every new number of classes, for inputs that need only be random.
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((N, D), np.float32)
    classifier = rng.standard_normal((num_classes, D), np.float32)
    if layout == "dv":
        classifier = np.ascontiguousarray(classifier.T)
    bias = rng.standard_normal(num_classes, np.float32)
    labels = rng.integers(0, num_classes, N).astype(np.int32)
    labels[1] = num_classes - 1  # the last class (on a padded shard)
    weights = rng.uniform(0.2, 2.0, num_classes).astype(np.float32)
    where = np.arange(N) % 4 != 2
    return hidden, classifier, bias, labels, weights, where


def make_inputs(num_classes, layout="vd", seed=0):
    """numpy_inputs. NumPy, not JAX arrays: a JAX array on one device that a program or
    ``device_put`` splits over the mesh, or that a program closes over, compiles programs
    of its own (slicing, staging) for each shape; NumPy arrays are copied over as they are."""
    return numpy_inputs(num_classes, layout, seed)


def some_right(hidden, classifier, bias, labels):
    """NumPy labels: every third row's the logits' argmax, so some predictions are right."""
    logits = hidden @ classifier.T + bias[None, :]
    return logits, np.where(np.arange(N) % 3 == 0, np.argmax(logits, -1), labels).astype(np.int32)


def _ignored(labels):
    labels = np.array(labels)  # NumPy: .at[] would compile a program for each shape
    labels[::5] = -100
    return labels


# name: builder(weights, where, labels) -> (options, labels)
OPTIONS = {
    "plain": lambda w, r, y: ({}, y),
    "smoothing": lambda w, r, y: (dict(label_smoothing=0.2), y),
    "weights": lambda w, r, y: (dict(class_weights=w), y),
    "ignore_index_where": lambda w, r, y: (dict(ignore_index=-100, where=r), _ignored(y)),
    "z_loss_softcap": lambda w, r, y: (dict(z_loss=1e-2, logit_softcap=2.5), y),
    "everything": lambda w, r, y: (
        dict(
            label_smoothing=0.15,
            class_weights=w,
            ignore_index=-100,
            where=r,
            z_loss=1e-2,
            logit_softcap=4.0,
        ),
        _ignored(y),
    ),
}

# (option, mesh, V, layout, reduction): even and uneven vocabularies, both layouts, and 13
# classes over 8 shards (2 per shard; the last shard holds padding only). "everything"
# holds every option at once; the others isolate the ones that touch every class. Every
# case computes reduction="none" (its per-row values feed the gradient, each with its own
# weight) and one more reduction: "mean" and "sum" each meet both meshes, both layouts,
# even and uneven vocabularies and every option.
CASES = [
    ("plain", "batch2_vocab4", 64, "vd", "mean"),
    ("smoothing", "batch2_vocab4", 61, "dv", "sum"),
    ("weights", "vocab8", 61, "vd", "sum"),
    ("z_loss_softcap", "batch2_vocab4", 61, "vd", "mean"),
    ("everything", "batch2_vocab4", 61, "vd", "mean"),
    ("everything", "batch2_vocab4", 64, "dv", "sum"),
    ("everything", "vocab8", 13, "vd", "mean"),
]


def value_and_grad_of(loss_fn, labels, reduction):
    """Value and gradients (hidden states, classifier, bias) of one objective that both
    reductions ("none" and ``reduction``) feed, each row with its own weight; the
    reductions' values as its aux."""
    cotangent = np.linspace(0.5, 1.5, N, dtype=np.float32)

    def objective(h, w, b):
        values = {
            name: loss_fn(h, w, labels, bias=b, reduction=name) for name in (reduction, "none")
        }
        total = values[reduction] + jnp.dot(values["none"], cotangent)
        return total, values

    return jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)


def through_the_head(g, hidden, classifier, layout="vd"):
    """Gradients of hidden states, classifier (its layout) and bias from ``g``, the float64
    gradient with respect to the logits ``h W^T + b``."""
    h, w = np.asarray(hidden, np.float64), np.asarray(classifier, np.float64)
    w = w.T if layout == "dv" else w
    grad_w = g.T @ h
    return g @ w, grad_w.T if layout == "dv" else grad_w, g.sum(0)


def head_logits(hidden, classifier, bias, layout="vd"):
    """``h W^T + b`` in float64."""
    w = np.asarray(classifier, np.float64)
    w = w.T if layout == "dv" else w
    b = 0.0 if bias is None else np.asarray(bias, np.float64)
    return np.asarray(hidden, np.float64) @ w.T + b


def reference_values_and_grads(case):
    """The float64 NumPy reference (tests/reference.py, the documented semantics) of one
    case: the values of both reductions and the gradients of the same objective as
    value_and_grad_of's, through the logits ``h W^T + b`` (no program compiled: the
    one-device loss, itself tested against this reference, compiled as much as the sharded
    cases did)."""
    option, _, num_classes, layout, reduction = case
    hidden, classifier, bias, labels, weights, where = numpy_inputs(num_classes, layout)
    options, labels = OPTIONS[option](weights, where, labels)

    def loss(logits, name):
        return np.asarray(reference.cross_entropy(logits, labels, reduction=name, **options))

    logits = head_logits(hidden, classifier, bias, layout)
    values = {name: loss(logits, name) for name in (reduction, "none")}
    # "mean" divides by a sum of row weights that no logit moves: row r's share of the
    # objective is none[r] (scale + cotangent[r]).
    scale = values[reduction] / values["none"].sum() if reduction == "mean" else 1.0
    cotangent = np.linspace(0.5, 1.5, N, dtype=np.float32).astype(np.float64)
    g = reference.rowwise_gradient(lambda z: loss(z, "none") * (scale + cotangent), logits)
    return values, through_the_head(g, hidden, classifier, layout)


@functools.cache
def sharded_values_and_grads():
    """``{case: (values, grads)}`` of the sharded loss for every case of CASES (each on its
    mesh).

    One compiled program (not 7): the cases' programs are small, and compiling each alone
    paid compilation's fixed cost 7 times. Each case keeps its own inputs, options and
    objective inside the program, and is compared on its own."""
    objectives, arguments = [], []
    for option, case_mesh, num_classes, layout, reduction in CASES:
        hidden, classifier, bias, labels, weights, where = make_inputs(num_classes, layout)
        options, labels = OPTIONS[option](weights, where, labels)
        options = dict(options, classifier_layout=layout)
        shape, names, class_axis, batch_axis = MESHES[case_mesh]
        loss_fn = functools.partial(
            sharded_linear_cross_entropy,
            mesh=auto_mesh(shape, names),
            class_axis_name=class_axis,
            batch_axis_name=batch_axis,
            **options,
            **CHUNKS,
        )
        objectives.append(value_and_grad_of(loss_fn, labels, reduction))
        arguments.append((hidden, classifier, bias))
    every_case = jax.jit(lambda arguments: [f(*a) for f, a in zip(objectives, arguments)])
    return {
        case: (values, grads) for case, ((_, values), grads) in zip(CASES, every_case(arguments))
    }


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, case)) for case in CASES])
def test_sharded_equals_single_device(case):
    values, grads = sharded_values_and_grads()[case]
    ref_values, ref_grads = reference_values_and_grads(case)
    assert values.keys() == ref_values.keys()
    for name in ref_values:
        assert values[name].shape == ref_values[name].shape, name
        np.testing.assert_allclose(
            values[name], ref_values[name], rtol=RTOL, atol=ATOL, err_msg=name
        )
    for name, got, want in zip(("hidden", "classifier", "bias"), grads, ref_grads):
        assert got.shape == want.shape, name
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)


def test_label_smoothing_spreads_over_the_global_classes():
    """K is all V classes: the V / S of one shard would give another loss."""
    mesh = auto_mesh((8,), ("vocab",))
    hidden, classifier, _, labels, _, _ = make_inputs(64)
    got = jax.jit(
        functools.partial(
            sharded_linear_cross_entropy,
            mesh=mesh,
            class_axis_name="vocab",
            label_smoothing=0.3,
            reduction="none",
        )
    )(hidden, classifier, labels)
    z = np.asarray(hidden, np.float64) @ np.asarray(classifier, np.float64).T
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    by_hand = 0.7 * (lse - z[np.arange(N), np.asarray(labels)]) + 0.3 * np.mean(
        lse[:, None] - z, axis=-1
    )
    np.testing.assert_allclose(got, by_hand, rtol=RTOL, atol=ATOL)


def test_bad_labels_are_nan_like_one_device():
    """Labels past V, including those that land on a padding row, give NaN; masked ones not."""
    mesh = auto_mesh((2, 4), ("batch", "vocab"))
    hidden, classifier, *_ = make_inputs(61)
    labels = np.zeros(N, np.int32)
    labels[[0, 2, 4, 6]] = [61, 63, -3, 62]
    where = np.arange(N) != 6
    got = jax.jit(
        functools.partial(
            sharded_linear_cross_entropy,
            mesh=mesh,
            class_axis_name="vocab",
            batch_axis_name="batch",
            reduction="none",
        )
    )(hidden, classifier, labels, where=where)
    want = linear_cross_entropy(hidden, classifier, labels, where=where, reduction="none")
    assert np.isnan(got).tolist() == np.isnan(want).tolist()
    assert np.flatnonzero(np.isnan(got)).tolist() == [0, 2, 4]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_gradients_land_sharded_like_their_inputs(layout):
    """Explicit mesh, inputs already placed: no padding, every gradient keeps its sharding."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    hidden, classifier, bias, labels, _, _ = make_inputs(64, layout)
    w_spec = P("model", None) if layout == "vd" else P(None, "model")
    loss_fn = functools.partial(
        sharded_linear_cross_entropy,
        mesh=mesh,
        class_axis_name="model",
        batch_axis_name="data",
        classifier_layout=layout,
        label_smoothing=0.1,
        **CHUNKS,
    )
    with jax.set_mesh(mesh):
        placed = [
            jax.device_put(x, NamedSharding(mesh, s))
            for x, s in (
                (hidden, P("data", None)),
                (classifier, w_spec),
                (bias, P("model")),
                (labels, P("data")),
            )
        ]
        value, grads = jax.jit(
            jax.value_and_grad(lambda h, w, b, y: loss_fn(h, w, y, bias=b), argnums=(0, 1, 2))
        )(*placed)
    # The float64 reference (tests/reference.py), its gradient by central differences.
    logits, y = head_logits(hidden, classifier, bias, layout), np.asarray(labels)
    want = reference.cross_entropy(logits, y, label_smoothing=0.1)
    g = reference.rowwise_gradient(
        lambda z: reference.cross_entropy(z, y, label_smoothing=0.1, reduction="none") / N,
        logits,
    )
    want_grads = through_the_head(g, hidden, classifier, layout)
    np.testing.assert_allclose(value, want, rtol=RTOL)
    for got, ref, spec in zip(grads, want_grads, (P("data", None), w_spec, P("model"))):
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
        assert got.sharding.spec == spec


def test_cotangent_without_vma_typing():
    """``shard_map(check_vma=False)`` hands each shard a share of the cotangent (summed by
    ``core.varying_axes.whole_cotangent``) and adds the hidden states' partial gradients itself; with
    ``check_vma=True`` the loss's backward adds them. Both give the one-device gradient
    (its float64 reference)."""
    mesh = auto_mesh((4,), ("vocab",))
    hidden, classifier, _, labels, weights, _ = make_inputs(24)
    options = dict(
        label_smoothing=0.1, z_loss=1e-2, class_weights=weights, reduction="sum", **CHUNKS
    )
    call = check_linear_call(hidden, classifier, labels, **options)

    def local(h, w):
        plan = fused.make_plan(call, h.shape, w.shape[0], axis_name="vocab")
        head = LinearHead(h, w, None)
        loss, _ = fused.rows_and_weights(head, labels, call.class_weights, None, None, plan)
        return jnp.sum(loss)

    def gradients(h, w):
        """shard_map's gradients with check_vma True and False."""
        out = []
        for check_vma in (True, False):
            loss = jax.shard_map(
                local, mesh=mesh, in_specs=(P(), P("vocab")), out_specs=P(), check_vma=check_vma
            )
            out.append(jax.grad(loss, argnums=(0, 1))(h, w))
        return out

    by_vma = jax.jit(gradients)(hidden, classifier)  # one program
    # One device's: the float64 reference, its gradient by central differences.
    ref = dict(options, class_weights=np.asarray(weights), reduction="none")
    del ref["token_chunk"], ref["vocab_chunk"]
    y = np.asarray(labels)
    g = reference.rowwise_gradient(
        lambda z: reference.cross_entropy(z, y, **ref), head_logits(hidden, classifier, None)
    )
    want = through_the_head(g, hidden, classifier)[:2]
    for check_vma, got in zip((True, False), by_vma):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"vma={check_vma}")


def test_argument_errors_name_the_fix():
    mesh = auto_mesh((2, 4), ("batch", "vocab"))
    hidden, classifier, _, labels, _, _ = make_inputs(16)
    with pytest.raises(ValueError, match="must divide by the 2 shards"):
        sharded_linear_cross_entropy(
            hidden[:7],
            classifier,
            labels[:7],
            mesh=mesh,
            class_axis_name="vocab",
            batch_axis_name="batch",
        )
    with pytest.raises(ValueError, match="different mesh axes"):
        sharded_linear_cross_entropy(
            hidden, classifier, labels, mesh=mesh, class_axis_name="vocab", batch_axis_name="vocab"
        )
    with pytest.raises(ValueError, match="It looks transposed"):
        sharded_linear_cross_entropy(
            hidden, classifier.T, labels, mesh=mesh, class_axis_name="vocab"
        )


# The compiled program: which collectives, on which shapes, between which devices.

ROWS, WIDTH, CLASSES = 64, 24, 1024
MESH_SHAPES = {"batch2_vocab4": (2, 4), "vocab8": (1, 8)}


def compiled_collectives(options, *, grad, mesh_name):
    """The program's collectives as ``(op, shape, over)``, ``over`` naming the mesh axis
    whose device groups it runs over, and the local rows and classes."""
    mesh = auto_mesh(MESH_SHAPES[mesh_name], ("batch", "vocab"))
    batches, vocabs = MESH_SHAPES[mesh_name]
    hidden = jax.ShapeDtypeStruct(
        (ROWS, WIDTH), jnp.float32, sharding=NamedSharding(mesh, P("batch", None))
    )
    classifier = jax.ShapeDtypeStruct(
        (CLASSES, WIDTH), jnp.float32, sharding=NamedSharding(mesh, P("vocab", None))
    )
    labels = jax.ShapeDtypeStruct((ROWS,), jnp.int32, sharding=NamedSharding(mesh, P("batch")))
    extra = dict(options)
    if extra.pop("weights", False):
        extra["class_weights"] = jax.ShapeDtypeStruct((CLASSES,), jnp.float32)
    if extra.pop("where", False):
        extra["where"] = jax.ShapeDtypeStruct((ROWS,), bool)

    arrays = {k: extra.pop(k) for k in ("class_weights", "where") if k in extra}

    def loss_fn(h, w, y, arrays):
        return sharded_linear_cross_entropy(
            h, w, y, mesh=mesh, class_axis_name="vocab", batch_axis_name="batch", **extra, **arrays
        )

    fn = jax.value_and_grad(loss_fn, argnums=(0, 1)) if grad else loss_fn
    text = jax.jit(fn).lower(hidden, classifier, labels, arrays).compile().as_text()
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    axes = {
        "vocab": {frozenset(row) for row in ids.tolist()},
        "batch": {frozenset(col) for col in ids.T.tolist()},
    }
    found = []
    for op, shapes, groups in hlo.collectives_with_groups(text):
        over = [name for name, g in axes.items() if g == groups]
        assert over, f"{op} {shapes} over device groups {groups}: neither mesh axis"
        found += [(op, shape, over[0]) for _, shape in shapes]
    return found, ROWS // batches, CLASSES // vocabs


def check_exchanges(found, rows, classes, *, grad):
    """Over the vocabulary axis: per-row statistics, and in the backward one ``[rows, d]``
    sum of the hidden states' gradient. Over the batch axis: the mean's scalars, and in
    the backward the classifier's gradient (the data-parallel gradient sum every
    batch-split step needs). No operand has ``V`` or ``[rows, classes]`` entries."""
    assert found, "no collective found: the HLO parser or the sharding is broken"
    hidden_sums, gradient_sums = [], []
    for op, shape, over in found:
        assert op == "all-reduce", f"{op} {shape}: only all-reduces expected"
        assert CLASSES not in shape, f"{op} {shape} over {over}"
        assert hlo.elements(shape) < rows * classes, f"{op} {shape} over {over}"
        if over == "vocab" and shape == (rows, WIDTH):
            hidden_sums.append(shape)
        elif over == "batch" and shape == (classes, WIDTH):
            gradient_sums.append(shape)
        else:  # a per-row statistic (over the vocabulary) or a scalar of the global mean
            assert hlo.elements(shape) <= rows, f"{op} {shape} over {over}"
            assert over == "vocab" or shape == (), f"{op} {shape} over {over}"
    assert hidden_sums == ([(rows, WIDTH)] if grad else [])
    assert len(gradient_sums) == (1 if grad and rows < ROWS else 0)
    return [(shape, over) for _, shape, over in found if len(shape) <= 1]


EVERYTHING = dict(
    weights=True, where=True, label_smoothing=0.1, ignore_index=-100, z_loss=1e-3, logit_softcap=5.0
)


@pytest.mark.parametrize(
    "options, mesh_name",
    [({}, "batch2_vocab4"), ({}, "vocab8"), (EVERYTHING, "batch2_vocab4")],
    ids=["plain-batch2_vocab4", "plain-vocab8", "everything-batch2_vocab4"],
)
def test_collectives_move_per_row_statistics(options, mesh_name):
    forward, rows, classes = compiled_collectives(options, grad=False, mesh_name=mesh_name)
    statistics = check_exchanges(forward, rows, classes, grad=False)
    # max, sum of exponentials, label logit (and the smoothing sum): one value per row each
    assert len([s for s, over in statistics if s == (rows,) and over == "vocab"]) >= 3
    both, _, _ = compiled_collectives(options, grad=True, mesh_name=mesh_name)
    # The backward adds no statistic: only the two gradient sums checked above.
    assert sorted(check_exchanges(both, rows, classes, grad=True)) == sorted(statistics)


def test_hlo_check_catches_gathered_logits():
    """Negative control: the naive sharded composition that gathers its logits is caught."""
    mesh = auto_mesh((2, 4), ("batch", "vocab"))

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        out_specs=P("batch"),
        check_vma=False,
        in_specs=(P("batch", None), P("vocab", None), P("batch")),
    )
    def gathered(h, w, y):
        logits = jax.lax.all_gather(h @ w.T, "vocab", axis=1, tiled=True)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]

    text = (
        jax.jit(gathered)
        .lower(
            jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.float32),
            jax.ShapeDtypeStruct((CLASSES, WIDTH), jnp.float32),
            jax.ShapeDtypeStruct((ROWS,), jnp.int32),
        )
        .compile()
        .as_text()
    )
    found = [
        (op, shape, "vocab")
        for op, shapes, _ in hlo.collectives_with_groups(text)
        for _, shape in shapes
    ]
    assert ("all-gather", (ROWS // 2, CLASSES), "vocab") in found
    with pytest.raises(AssertionError):
        check_exchanges(found, ROWS // 2, CLASSES // 4, grad=False)


def _companions_total(loss, aux):
    """A scalar through the loss, lse, the entropy and the z-loss term (each row its own
    weight), so that their cotangents all reach the rule."""
    rows = jnp.linspace(0.5, 1.5, aux.lse.size).reshape(aux.lse.shape)
    return loss + jnp.sum(rows * aux.lse) - jnp.sum(rows[::-1] * aux.entropy) + jnp.sum(aux.z_loss)


COMPANIONS = ("lse", "z_loss", "correct", "entropy")


def reference_companions(logits, labels, options, reduction="mean"):
    """The float64 reference (tests/reference.py) of ``_companions_total`` and the
    companions, and the total's gradient with respect to the logits (by central
    differences: every term is a sum over rows of its own row's value)."""
    rows = np.linspace(0.5, 1.5, len(labels), dtype=np.float32).astype(np.float64)
    kw = {k: v for k, v in options.items() if k not in ("label_smoothing",)}

    def per_row(z, scale):
        lse, z_loss, _, entropy = reference.companions(z, labels, **kw)
        loss = reference.cross_entropy(z, labels, reduction="none", **options)
        return loss * scale + rows * lse - rows[::-1] * entropy + z_loss

    loss = reference.cross_entropy(logits, labels, reduction=reduction, **options)
    none = reference.cross_entropy(logits, labels, reduction="none", **options)
    scale = loss / none.sum() if reduction == "mean" else 1.0
    total = per_row(logits, scale).sum() - (none * scale).sum() + loss
    aux = dict(zip(COMPANIONS, reference.companions(logits, labels, **kw)))
    return total, aux, reference.rowwise_gradient(lambda z: per_row(z, scale), logits)


def assert_same_companions(value, aux, want, want_aux):
    """The total and every companion equal the reference's; some predictions right, some
    not."""
    np.testing.assert_allclose(value, want, rtol=RTOL, atol=ATOL)
    for field in COMPANIONS:
        np.testing.assert_allclose(
            np.asarray(getattr(aux, field), np.float32), np.asarray(want_aux[field], np.float32),
            rtol=RTOL, atol=ATOL, err_msg=field,
        )  # fmt: skip
    assert 0 < int(np.sum(aux.correct)) < N


@pytest.mark.parametrize("mesh_name, num_classes", [("batch2_vocab4", 23), ("vocab8", 40)])
def test_companions_equal_one_device(mesh_name, num_classes):
    """``return_aux=True`` on a vocabulary split over 4 or 8 shards (23 classes: padded),
    ragged chunks: the companions and the gradients through them equal the float64
    reference of the one-device loss (tests/reference.py).

    Known JAX 0.10 issue (not 0.12): a process that first differentiates through
    ``sharded_linear_cross_entropy(..., return_aux=True)`` on an 8-device mesh and then
    through ``sharded_cross_entropy(..., return_aux=True)`` on a 2 x 4 mesh fails to compile
    the second gradient (``IndivisibleError``: JAX recovers a sharding from the first
    mesh); see docs/scaling.md."""
    shape, names, class_axis, batch_axis = MESHES[mesh_name]
    mesh = auto_mesh(shape, names)
    hidden, classifier, bias, labels, weights, where = numpy_inputs(num_classes, seed=4)
    _, labels = some_right(hidden, classifier, bias, labels)
    options = dict(z_loss=1e-2, logit_softcap=3.0, class_weights=weights, where=where)

    def sharded(h, w, b):
        out = sharded_linear_cross_entropy(
            h, w, labels, bias=b, mesh=mesh, class_axis_name=class_axis,
            batch_axis_name=batch_axis, return_aux=True, **options, **CHUNKS,
        )  # fmt: skip
        return _companions_total(*out), out[1]

    (value, aux), grads = jax.jit(jax.value_and_grad(sharded, (0, 1, 2), has_aux=True))(
        hidden, classifier, bias
    )
    want, want_aux, g = reference_companions(head_logits(hidden, classifier, bias), labels, options)
    assert_same_companions(value, aux, want, want_aux)
    for name, got, expected in zip(("hidden", "classifier", "bias"), grads,
                                   through_the_head(g, hidden, classifier)):  # fmt: skip
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=name)


def test_sharded_cross_entropy_companions_equal_one_device():
    """The same for the logits' loss, with a per-logit mask, on 2 x 4 devices."""
    from jaxsoftmax import sharded_cross_entropy

    mesh = auto_mesh((2, 4), ("batch", "vocab"))
    hidden, classifier, bias, labels, _, _ = numpy_inputs(23, seed=5)
    logits, labels = some_right(hidden, classifier, bias, labels)
    class_mask = (np.arange(23)[None, :] + np.arange(N)[:, None]) % 5 != 1
    class_mask[np.arange(N), labels] = True
    options = dict(z_loss=1e-2, where=class_mask, label_smoothing=0.1)

    def sharded(z):
        out = sharded_cross_entropy(
            z, labels, mesh=mesh, class_axis_name="vocab", batch_axis_name="batch",
            return_aux=True, **options,
        )  # fmt: skip
        return _companions_total(*out), out[1]

    (value, aux), grad = jax.jit(jax.value_and_grad(sharded, has_aux=True))(logits)
    want, want_aux, want_grad = reference_companions(logits, labels, options)
    assert_same_companions(value, aux, want, want_aux)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mesh_name, num_classes", [("batch2_vocab4", 23)])
def test_vocab_mask_equals_one_device(mesh_name, num_classes):
    """A vocabulary with holes and a padded end, split unevenly (23 classes over 4 shards):
    both sharded losses equal the float64 reference of one device (a vocabulary mask is
    the same class mask on every row), with label smoothing (whose mass the mask keeps
    off the missing classes) and the companions."""
    from jaxsoftmax import sharded_cross_entropy

    shape, names, class_axis, batch_axis = MESHES[mesh_name]
    mesh = auto_mesh(shape, names)
    hidden, classifier, bias, labels, weights, _ = numpy_inputs(num_classes, seed=6)
    mask = (np.arange(num_classes) % 5 != 3) & (np.arange(num_classes) < num_classes - 4)
    labels = np.where(mask[labels], labels, 0).astype(np.int32)
    logits = hidden @ classifier.T + bias[None, :]
    options = dict(vocab_mask=mask, label_smoothing=0.1, class_weights=weights, z_loss=1e-3)
    on_mesh = dict(mesh=mesh, class_axis_name=class_axis, batch_axis_name=batch_axis)

    def fused(h, w, b):
        return _companions_total(*sharded_linear_cross_entropy(
            h, w, labels, bias=b, return_aux=True, **options, **on_mesh, **CHUNKS
        ))  # fmt: skip

    def logits_loss(z):
        return _companions_total(
            *sharded_cross_entropy(z, labels, return_aux=True, **options, **on_mesh)
        )

    # Both sharded losses: one program.
    results = jax.jit(
        lambda args, z: {
            "fused": jax.value_and_grad(fused, (0, 1, 2))(*args),
            "logits": jax.value_and_grad(logits_loss)(z),
        }
    )((hidden, classifier, bias), logits)
    ref_options = dict(options, where=np.broadcast_to(mask, (N, num_classes)))
    del ref_options["vocab_mask"]
    for name, z in (("fused", head_logits(hidden, classifier, bias)), ("logits", logits)):
        want, _, g = reference_companions(z, labels, ref_options)
        want_grads = through_the_head(g, hidden, classifier) if name == "fused" else g
        got_value, got_grads = results[name]
        np.testing.assert_allclose(got_value, want, rtol=RTOL, atol=ATOL, err_msg=name)
        for got, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(got, w, rtol=RTOL, atol=ATOL, err_msg=name)
    assert np.all(np.asarray(results["fused"][1][1])[~mask] == 0)


# name: (mesh, V, options): each divergence, uneven vocabularies (23 over 4 shards, 13 over 8:
# the last shard padding only), the hard term with its own statistics (T != 1) and shared
# (T = 1), biases, ignore_index, where, vocab_mask and the [d, V] layout.
DISTILLATION_CASES = {
    "forward_kl-batch2_vocab4-mean": ("batch2_vocab4", 23, dict(
        temperature=2.0, hard_weight=0.5, ignore_index=-100, bias=True)),
    "jsd-vocab8-none": ("vocab8", 13, dict(
        divergence="jsd", beta=0.3, temperature=1.5, vocab_mask=True, bias=True,
        where=True, reduction="none")),
    "reverse_kl-batch2_vocab4-dv-sum": ("batch2_vocab4", 23, dict(
        divergence="reverse_kl", hard_weight=1.0, vocab_mask=True, classifier_layout="dv",
        reduction="sum")),
}  # fmt: skip


@pytest.mark.parametrize("case", DISTILLATION_CASES)
def test_distillation_equals_one_device(case):
    """``sharded_linear_distillation_loss`` against the float64 reference of the one-device
    loss (tests/reference.py): the value
    (one reduction per case, the three among the cases) and the gradients of both models' hidden states, classifiers and
    biases (those come back split like their inputs)."""
    mesh_name, num_classes, options = DISTILLATION_CASES[case]
    shape, names, class_axis, batch_axis = MESHES[mesh_name]
    mesh = auto_mesh(shape, names)
    options = dict(options)
    layout = options.get("classifier_layout", "vd")
    student = make_inputs(num_classes, layout, seed=7)
    teacher = make_inputs(num_classes, layout, seed=8)
    labels, where = student[3], student[5]
    mask = np.arange(num_classes) % 7 != 5
    if options.pop("vocab_mask", False):
        options["vocab_mask"] = mask
        labels = np.where(mask[labels], labels, 0).astype(np.int32)
    if options.get("ignore_index") is not None:
        labels = _ignored(labels)
    if options.pop("where", False):
        options["where"] = where
    with_bias = options.pop("bias", False)
    on_mesh = dict(mesh=mesh, class_axis_name=class_axis, batch_axis_name=batch_axis)

    def objective(h_s, w_s, b_s, h_t, w_t, b_t):
        value = sharded_linear_distillation_loss(
            h_s, w_s, h_t, w_t, labels=labels, student_bias=b_s if with_bias else None,
            teacher_bias=b_t if with_bias else None, **options, **on_mesh, **CHUNKS,
        )  # fmt: skip
        if value.ndim:  # per token: a cotangent that differs from row to row
            return jnp.dot(value, jnp.linspace(0.5, 1.5, N)), value
        return value, value

    args = (*student[:3], *teacher[:3])
    (_, value), grads = jax.jit(jax.value_and_grad(objective, range(6), has_aux=True))(*args)

    # The float64 reference (tests/reference.py) and its gradients with respect to both
    # models' logits by central differences (each row's loss reads its own rows only).
    ref = {k: v for k, v in options.items() if k not in ("bias", "classifier_layout")}
    ref.update(labels=np.asarray(labels), reduction="none")
    if "vocab_mask" in ref:
        ref["vocab_mask"] = np.asarray(ref["vocab_mask"])
    reduction = options.get("reduction", "mean")
    z_s, z_t = (head_logits(*model[:2], model[2] if with_bias else None, layout)
                for model in (student, teacher))  # fmt: skip
    none = reference.distillation(z_s, z_t, **ref)
    want = reference.distillation(z_s, z_t, **dict(ref, reduction=reduction))
    if reduction == "none":
        scale = np.linspace(0.5, 1.5, N, dtype=np.float32).astype(np.float64)
    else:
        scale = want / none.sum() if reduction == "mean" else 1.0
    g_s = reference.rowwise_gradient(lambda z: reference.distillation(z, z_t, **ref) * scale, z_s)
    g_t = reference.rowwise_gradient(lambda z: reference.distillation(z_s, z, **ref) * scale, z_t)
    want_grads = [*through_the_head(g_s, *student[:2], layout),
                  *through_the_head(g_t, *teacher[:2], layout)]  # fmt: skip
    np.testing.assert_allclose(value, want, rtol=RTOL, atol=ATOL, err_msg="value")
    for name, got, w in zip(("h_s", "w_s", "b_s", "h_t", "w_t", "b_t"), grads, want_grads):
        if not with_bias and name.startswith("b"):
            w = np.zeros_like(w)  # the bias is not used
        np.testing.assert_allclose(got, w, rtol=RTOL, atol=ATOL, err_msg=name)


def test_distillation_collectives_move_per_row_numbers():
    """The compiled loss and gradients of both models (64 tokens, 1024 classes, 2 x 4 mesh):
    all-reduces only; over the vocabulary axis per-row numbers and the two hidden states'
    ``[rows, d]`` gradient sums; over the batch axis the scalars of the mean and the two
    classifiers' gradient sums. No operand has ``V`` or ``[rows, classes]`` entries."""
    mesh = auto_mesh((2, 4), ("batch", "vocab"))
    rows, classes = ROWS // 2, CLASSES // 4

    def placed(shape, spec):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))

    hidden, classifier = placed((ROWS, WIDTH), P("batch", None)), placed((CLASSES, WIDTH), P("vocab", None))  # fmt: skip
    loss = lambda h_s, w_s, h_t, w_t: sharded_linear_distillation_loss(
        h_s, w_s, h_t, w_t, mesh=mesh, class_axis_name="vocab", batch_axis_name="batch",
        divergence="jsd", temperature=2.0,
    )  # fmt: skip
    grad = jax.jit(jax.value_and_grad(loss, range(4)))
    text = grad.lower(hidden, classifier, hidden, classifier).compile().as_text()
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    over_vocab = {frozenset(row) for row in ids.tolist()}
    found = {"vocab": [], "batch": []}
    for op, shapes, groups in hlo.collectives_with_groups(text):
        assert op == "all-reduce", (op, shapes)
        for _, shape in shapes:
            found["vocab" if groups == over_vocab else "batch"].append(shape)
    for shape in found["vocab"] + found["batch"]:
        assert CLASSES not in shape and hlo.elements(shape) < rows * classes, shape
    assert sorted(s for s in found["vocab"] if hlo.elements(s) > rows) == [(rows, WIDTH)] * 2
    assert all(hlo.elements(s) <= rows for s in found["vocab"] if s != (rows, WIDTH))
    assert sorted(s for s in found["batch"] if s) == [(classes, WIDTH)] * 2

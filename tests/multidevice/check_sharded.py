"""Vocabulary-parallel cross-entropy on 8 virtual CPU devices.

Not collected by the default test run (the name does not start with ``test_``): it needs
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX starts, so
``tests/test_sharded.py`` runs it with pytest in a subprocess. To run it by hand::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m pytest -q -p no:cacheprovider tests/multidevice/check_sharded.py

Every sharded result is compared with the single-device ``cross_entropy`` (value and
gradients, every option, even and uneven vocabularies), and the compiled programs'
collectives are read from their HLO.
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

ATOL = RTOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() != 8:
        pytest.fail(
            f"these checks need 8 devices; got {jax.device_count()}. Run them with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharded.py "
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
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    logits = 3.0 * jax.random.normal(keys[0], (num_rows, num_classes), jnp.float32)
    if probabilities:
        targets = jax.nn.softmax(2.0 * jax.random.normal(keys[1], (num_rows, num_classes)))
    else:
        targets = jax.random.randint(keys[1], (num_rows,), 0, num_classes)
        targets = targets.at[1].set(num_classes - 1)  # the last (possibly padded-shard) class
    weights = jax.random.uniform(keys[2], (num_classes,), minval=0.2, maxval=2.0)
    row_mask = jnp.arange(num_rows) % 4 != 2
    class_mask = jax.random.uniform(keys[3], (num_rows, num_classes)) > 0.3
    class_mask = class_mask.at[3].set(False)  # a row with no class left
    return logits, targets, weights, row_mask, class_mask


# name: (probabilities?, builder(weights, row_mask, class_mask, targets) -> (kwargs, targets))
def _ignored(targets):
    return targets.at[::5].set(-100)


OPTIONS = {
    "int_plain": (False, lambda w, r, c, t: ({}, t)),
    "int_smoothing": (False, lambda w, r, c, t: (dict(label_smoothing=0.2), t)),
    "int_weights": (False, lambda w, r, c, t: (dict(class_weights=w), t)),
    "int_ignore_index": (False, lambda w, r, c, t: (dict(ignore_index=-100), _ignored(t))),
    "int_row_mask": (False, lambda w, r, c, t: (dict(where=r), t)),
    "int_class_mask": (False, lambda w, r, c, t: (dict(where=c, label_smoothing=0.1), t)),
    "int_z_loss_softcap": (False, lambda w, r, c, t: (dict(z_loss=1e-2, logit_softcap=2.5), t)),
    "int_everything": (
        False,
        lambda w, r, c, t: (
            dict(
                label_smoothing=0.15,
                class_weights=w,
                ignore_index=-100,
                where=r,
                z_loss=1e-2,
                logit_softcap=4.0,
            ),
            _ignored(t),
        ),
    ),
    "int_class_mask_weights": (
        False,
        lambda w, r, c, t: (dict(where=c, class_weights=w, label_smoothing=0.1, z_loss=1e-3), t),
    ),
    "prob_plain": (True, lambda w, r, c, t: ({}, t)),
    "prob_smoothing_weights": (
        True,
        lambda w, r, c, t: (dict(label_smoothing=0.2, class_weights=w), t),
    ),
    "prob_class_mask_z_softcap": (
        True,
        lambda w, r, c, t: (dict(where=c, z_loss=1e-2, logit_softcap=3.0), t),
    ),
    "prob_row_mask": (True, lambda w, r, c, t: (dict(where=r), t)),
}

# (layout, number of classes): an even split, an uneven one, and one where a whole shard
# holds only padding (13 classes over 8 shards: 2 per shard, the last shard none).
SPLITS = [("batch2_vocab4", 64), ("batch2_vocab4", 61), ("vocab8", 13)]
CASES = [
    (option, layout, num_classes)
    for option in OPTIONS
    for layout, num_classes in SPLITS
    # The all-padding shard only for the options that touch every class.
    if num_classes != 13 or option in ("int_everything", "prob_smoothing_weights")
]


@functools.cache
def sharded_and_reference(layout, num_classes):
    """Values of every reduction and gradients, sharded and on one device, for every option
    CASES pairs with this layout and vocabulary: {option: ((values, grads), (ref_values,
    ref_grads))}.

    The sharded losses of all these options are one compiled program and the single-device
    ones another (6 programs for the 28 cases, not 56): each program's fixed cost of
    compilation is paid once per group instead of once per option."""
    shape, names, class_axis, batch_axis = LAYOUTS[layout]
    axes = dict(
        mesh=auto_mesh(shape, names), class_axis_name=class_axis, batch_axis_name=batch_axis
    )
    cotangent = jnp.linspace(0.5, 1.5, 16)

    def objective(loss_fn, with_sum, z, t):
        # One gradient that every reduction feeds (each with a different weight). "sum" is
        # "mean" times its denominator in the same code, so it is compiled in a few cases
        # only, to keep the run short.
        values = {"mean": loss_fn(z, t), "none": loss_fn(z, t, reduction="none")}
        total = values["mean"] + jnp.dot(values["none"], cotangent)
        if with_sum:
            values["sum"] = loss_fn(z, t, reduction="sum")
            total = total + 0.25 * values["sum"]
        return total, values

    chosen = [option for option, *split in CASES if split == [layout, num_classes]]
    arguments, sharded, single = [], [], []
    for option in chosen:
        probabilities, build = OPTIONS[option]
        with_sum = option in ("int_everything", "prob_smoothing_weights", "int_class_mask")
        logits, targets, weights, row_mask, class_mask = make_inputs(
            16, num_classes, probabilities=probabilities
        )
        options, targets = build(weights, row_mask, class_mask, targets)
        arguments.append((logits, targets))
        argnums = (0, 1) if probabilities else 0

        def gradient_of(loss_fn, with_sum=with_sum, argnums=argnums):
            objective_of_loss = functools.partial(objective, loss_fn, with_sum)
            return jax.value_and_grad(objective_of_loss, argnums=argnums, has_aux=True)

        sharded.append(gradient_of(functools.partial(sharded_cross_entropy, **axes, **options)))
        single.append(gradient_of(functools.partial(cross_entropy, **options)))

    results = []
    for losses in (sharded, single):
        every_option = jax.jit(
            lambda arguments, losses=losses: [
                value_and_grad(*args) for value_and_grad, args in zip(losses, arguments)
            ]
        )
        results.append([(values, grads) for (_, values), grads in every_option(arguments)])
    return {option: pair for option, pair in zip(chosen, zip(*results))}


@pytest.mark.parametrize(
    "option, layout, num_classes", CASES, ids=[f"{o}-{l}-V{v}" for o, l, v in CASES]
)
def test_sharded_equals_single_device(option, layout, num_classes):
    (values, grads), (ref_values, ref_grads) = sharded_and_reference(layout, num_classes)[option]
    assert values.keys() == ref_values.keys()
    for name in values:
        got, want = values[name], ref_values[name]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert got.shape == want.shape
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


BF16_OPTIONS = ["int_plain", "int_smoothing", "int_class_mask", "prob_plain"]


@functools.cache
def bf16_sharded_and_reference():
    """{option: ((value, grads), (ref_value, ref_grads))} for bf16 logits (and bf16
    probability targets) at V = 61 on the 2 x 4 mesh: as for sharded_and_reference, the
    options' sharded losses are one program and their single-device ones another."""
    axes = dict(
        mesh=auto_mesh((2, 4), ("batch", "vocab")),
        class_axis_name="vocab",
        batch_axis_name="batch",
    )
    arguments, sharded, single = [], [], []
    for option in BF16_OPTIONS:
        probabilities, build = OPTIONS[option]
        logits, targets, weights, row_mask, class_mask = make_inputs(
            16, 61, probabilities=probabilities
        )
        options, targets = build(weights, row_mask, class_mask, targets)
        logits = logits.astype(jnp.bfloat16)
        if probabilities:
            targets = targets.astype(jnp.bfloat16)
        arguments.append((logits, targets))
        argnums = (0, 1) if probabilities else 0
        loss_fn = functools.partial(sharded_cross_entropy, **axes, **options)
        sharded.append(jax.value_and_grad(loss_fn, argnums=argnums))
        loss_fn = functools.partial(cross_entropy, **options)
        single.append(jax.value_and_grad(loss_fn, argnums=argnums))
    results = [
        jax.jit(
            lambda arguments, losses=losses: [
                value_and_grad(*args) for value_and_grad, args in zip(losses, arguments)
            ]
        )(arguments)
        for losses in (sharded, single)
    ]
    return dict(zip(BF16_OPTIONS, zip(*results)))


@pytest.mark.parametrize("option", BF16_OPTIONS)
def test_bf16_logits_sharded_equal_single_device(option):
    """bf16 logits (and bf16 probability targets): each shard reads its bf16 logits and label
    logit as they are and widens them to float32; the sharded loss and gradients equal the
    single-device ones up to the final rounding to bf16 (the partial sums add up in another
    order)."""
    (value, grads), (ref_value, ref_grads) = bf16_sharded_and_reference()[option]
    assert value.dtype == ref_value.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(value), np.float32(ref_value), rtol=1e-2)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert got.dtype == want.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-4
        )


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
    labels = labels.at[0].set(61).at[2].set(63).at[4].set(64).at[5].set(-3).at[6].set(62)
    row_mask = jnp.ones(8, bool).at[6].set(False)  # the bad label of row 6 is masked out
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
    np.testing.assert_allclose(loss_fn(logits, labels), cross_entropy(logits, labels), rtol=RTOL)
    with pytest.raises(Exception, match=r"found label 62 .* 0 <= label < 61"):
        loss_fn(logits, labels.at[3].set(62))


def test_explicit_mesh_and_several_leading_axes():
    """``jax.make_mesh`` (Explicit axes) and logits [N, T, V] with the batch split."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    logits = jax.random.normal(keys[0], (4, 3, 40))
    labels = jax.random.randint(keys[1], (4, 3), 0, 40)
    loss_fn = functools.partial(
        sharded_cross_entropy,
        mesh=mesh,
        class_axis_name="model",
        batch_axis_name="data",
        label_smoothing=0.1,
    )
    got, got_grad = jax.jit(jax.value_and_grad(loss_fn))(logits, labels)
    want, want_grad = jax.jit(
        jax.value_and_grad(functools.partial(cross_entropy, label_smoothing=0.1))
    )(logits, labels)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(got_grad, want_grad, rtol=RTOL, atol=ATOL)
    rows = jax.jit(functools.partial(loss_fn, reduction="none"))(logits, labels)
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
            logits, labels, mesh=mesh, class_axis_name="vocab", class_weights=jnp.ones(15)
        )


# The building block: the public losses with axis_name= inside the user's own shard_map.


def test_axis_name_inside_shard_map_with_every_public_loss():
    mesh = auto_mesh((2, 4), ("batch", "vocab"))
    logits, labels, weights, _, _ = make_inputs(8, 32, probabilities=False)
    _, probs, *_ = make_inputs(8, 32, probabilities=True)
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

    def general_single(z, y):
        return cross_entropy(
            z, y, class_weights=weights, label_smoothing=0.1, z_loss=1e-2, reduction="none"
        )

    cotangent = jnp.linspace(-1.0, 2.0, 8)
    tangent = jax.random.normal(jax.random.PRNGKey(7), logits.shape)

    @functools.partial(jax.jit, static_argnums=(0, 2, 3))
    def evaluate(fn, targets, argnums, forward_mode):
        loss, pullback = jax.vjp(fn, logits, targets)
        grads = pullback(cotangent)
        out = [loss] + [grads[i] for i in argnums]
        if forward_mode:  # the drop-ins' custom_jvp, under shard_map too
            out.append(jax.jvp(lambda z: fn(z, targets), (logits,), (tangent,))[1])
        return out

    cases = [
        (lambda z, y: general(z, y, weights), general_single, labels, (0,), False),
        (integer, softmax_cross_entropy_with_integer_labels, labels, (0,), True),
        (soft, softmax_cross_entropy, probs, (0, 1), True),
    ]
    for sharded, single, targets, argnums, forward_mode in cases:
        got = evaluate(sharded, targets, argnums, forward_mode)
        want = evaluate(single, targets, argnums, forward_mode)
        assert len(got) == len(want) == 1 + len(argnums) + forward_mode
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


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
    batch = NamedSharding(mesh, P("batch"))
    logits = jax.device_put(
        jnp.zeros((N_ROWS, N_CLASSES)), NamedSharding(mesh, P("batch", "vocab"))
    )
    labels = jax.device_put(jnp.zeros((N_ROWS,), jnp.int32), batch)
    if options.pop("probabilities", False):
        labels = jax.device_put(
            jnp.full((N_ROWS, N_CLASSES), 1.0 / N_CLASSES), NamedSharding(mesh, P("batch", "vocab"))
        )
    extra = {}
    if options.pop("weights", False):
        extra["class_weights"] = jax.device_put(
            jnp.ones((N_CLASSES,)), NamedSharding(mesh, P("vocab"))
        )
    if options.pop("row_mask", False):
        extra["where"] = jax.device_put(jnp.ones((N_ROWS,), bool), batch)
    if options.pop("class_mask", False):
        extra["where"] = jax.device_put(
            jnp.ones((N_ROWS, N_CLASSES), bool), NamedSharding(mesh, P("batch", "vocab"))
        )

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

    logits = jnp.zeros((N_ROWS, N_CLASSES))
    labels = jnp.zeros((N_ROWS,), jnp.int32)
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
    options = dict(label_smoothing=0.1, z_loss=1e-2, reduction="sum")
    single = functools.partial(cross_entropy, **options)
    for targets, spec in ((labels, P()), (probs, P(None, "vocab"))):
        argnums = (0,) if targets.dtype == jnp.int32 else (0, 1)
        ref = jax.jit(jax.grad(single, argnums=argnums))(logits, targets)
        for check_vma in (True, False):
            loss = jax.shard_map(
                functools.partial(cross_entropy, axis_name="vocab", **options),
                mesh=mesh,
                in_specs=(P(None, "vocab"), spec),
                out_specs=P(),
                check_vma=check_vma,
            )
            got = jax.jit(jax.grad(loss, argnums=argnums))(logits, targets)
            for a, b in zip(got, ref):
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"vma={check_vma}")

    # pmap: the classes split over the mapped axis, every device returns the same loss.
    shards = logits.reshape(6, 4, 6).transpose(1, 0, 2)
    per_device = jax.pmap(
        functools.partial(cross_entropy, axis_name="vocab", **options),
        axis_name="vocab",
        in_axes=(0, None),
        devices=jax.devices()[:4],
    )
    want = jax.grad(single)(logits, labels)
    for pick in (lambda out: out[0], jnp.mean):
        got = jax.grad(lambda s: pick(per_device(s, labels)))(shards)
        got = got.transpose(1, 0, 2).reshape(6, 24)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

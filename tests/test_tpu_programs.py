"""What a TPU gets of the fused losses: float32 chunks rounded inside the loops.

``jaxsoftmax/core/tpu_programs.py`` keeps XLA:TPU from hoisting a bf16 copy of the whole
classifier out of the chunk loops. No TPU is needed to see it: ``jax.export`` lowers a program
for ``"tpu"`` on this machine (no compilation), and the exported program is what a TPU
compiles. The rounding itself is checked against ml_dtypes' float32 -> bfloat16 conversion.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import reference
from jax import export

from jaxsoftmax import linear_cross_entropy, linear_distillation_loss
from jaxsoftmax.core import tpu_programs
from jaxsoftmax.tiles import tpu_layout

# Several chunks on every axis, whatever the platform's tile sizes: only lowered, never run.
N, D, V = 4096, 8, 65536


def _fused(layout):
    def loss(hidden, classifier, labels):
        return linear_cross_entropy(
            hidden, classifier, labels, classifier_layout=layout, method="recompute"
        )

    return loss


def _distillation(hidden, classifier, labels):
    # the teacher is the student's own head, frozen: its chunks are sliced all the same
    teacher = (jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(classifier))
    return linear_distillation_loss(hidden, classifier, *teacher, labels=labels)


# name: (loss of (hidden, classifier, labels), the classifier's layout)
LOSSES = {
    "vd": (_fused("vd"), "vd"),
    "dv": (_fused("dv"), "dv"),
    "distillation": (_distillation, "vd"),
}


@functools.cache
def rounded_shapes(name, dtype, platform, precision=None):
    """The operand shapes of the bf16-precision roundings in the exported program of
    ``value_and_grad`` of ``LOSSES[name]`` with respect to hidden and classifier."""
    loss, layout = LOSSES[name]
    hidden = jax.ShapeDtypeStruct((N, D), dtype)
    classifier = jax.ShapeDtypeStruct((D, V) if layout == "dv" else (V, D), dtype)
    labels = jax.ShapeDtypeStruct((N,), jnp.int32)
    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with jax.default_matmul_precision(precision):
        exported = export.export(program, platforms=[platform])(hidden, classifier, labels)
    text = exported.mlir_module()
    return re.findall(r"stablehlo\.reduce_precision .*format = e8m7 : tensor<(\w+)>", text)


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_float32_chunks_are_rounded_inside_the_loops_only_for_the_tpu(layout):
    shapes = rounded_shapes(layout, jnp.float32, "tpu")
    assert shapes, "the TPU program rounds no chunk: it would hold a bf16 copy of the classifier"
    whole = {f"{N}x{D}xf32", f"{D}x{V}xf32", f"{V}x{D}xf32"}
    assert not set(shapes) & whole, f"a whole array is rounded, not its chunks: {shapes}"
    for shape in shapes:  # chunks of the hidden states ([T, d]) or the classifier
        rows, columns = (int(n) for n in shape.removesuffix("xf32").split("x"))
        assert D in (rows, columns) and rows * columns < V * D, shape
    # Not for the CPU or a GPU, not for bf16 (the product takes it as it is), and not where
    # the user asks for float32 products.
    assert rounded_shapes(layout, jnp.float32, "cpu") == []
    assert rounded_shapes(layout, jnp.float32, "cuda") == []
    assert rounded_shapes(layout, jnp.bfloat16, "tpu") == []
    assert rounded_shapes(layout, jnp.float32, "tpu", precision="float32") == []


def test_the_fused_distillation_rounds_its_chunks_on_the_tpu():
    assert rounded_shapes("distillation", jnp.float32, "tpu")
    assert rounded_shapes("distillation", jnp.float32, "cuda") == []


def run_the_tpu_program_here(loss, *args):
    """``value_and_grad(loss)`` (hidden and classifier) lowered for a TPU at the default matmul
    precision, run on the CPU: the TPU's program has nothing but XLA operations this CPU runs
    too, and the CPU multiplies in float32."""
    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    anywhere = [export.DisabledSafetyCheck.platform()]
    shapes = [jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype) for a in args]
    with jax.default_matmul_precision(None):  # users' default (tests/conftest.py sets float32)
        exported = export.export(program, platforms=["tpu"], disabled_checks=anywhere)(*shapes)
    return exported.call(*args)


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_the_tpu_program_multiplies_rounded_operands_and_sums_unrounded(layout):
    """Its loss and gradients are those of the bf16-rounded hidden states and classifier
    (what a TPU's one-pass product multiplies), in float32: the sums of the gradients are
    not rounded. 72 classes in chunks of 16: the last chunk overlaps the one before, so the
    classifier's gradient is read back and added to."""
    rng = np.random.default_rng(1)
    n, d, v = 24, 8, 72
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    classifier = rng.normal(size=(v, d)).astype(np.float32)
    labels = rng.integers(0, v, n).astype(np.int32)

    def loss(h, w, y):
        return linear_cross_entropy(
            h, w, y, classifier_layout=layout, token_chunk=8, vocab_chunk=16, method="recompute"
        )

    w = classifier if layout == "vd" else classifier.T
    value, (d_hidden, d_w) = run_the_tpu_program_here(loss, hidden, w, labels)
    d_classifier = np.asarray(d_w) if layout == "vd" else np.asarray(d_w).T

    def expected(h, k):  # float64 from the inputs as given
        h, k = np.float64(h), np.float64(k)
        per_row, d_logits = reference.loss_and_gradient(h @ k.T, np.eye(v)[labels])
        return per_row.mean(), d_logits @ k / n, d_logits.T @ h / n

    with np.errstate(invalid="ignore"):
        bf16 = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)
    rounded, unrounded = expected(bf16(hidden), bf16(classifier)), expected(hidden, classifier)
    for name, got, want, other in zip(
        ("loss", "hidden's gradient", "classifier's gradient"),
        (value, d_hidden, d_classifier),
        rounded,
        unrounded,
    ):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6, err_msg=name)
        assert np.max(np.abs(want - other)) > 1e-4, f"{name}: the inputs were not rounded"


def test_the_rounding_is_the_float32_to_bfloat16_conversion():
    """Round to nearest, ties to even, as a product at the default precision rounds its
    operands, for ordinary, tied, huge, tiny, subnormal and non-finite values."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate(
        [
            bits.view(np.float32),  # every exponent, NaN and infinities among them
            np.float32([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, 1e-40, -0.0]),
            np.float32([np.inf, -np.inf, np.nan, 0.0]),
        ]
    ).reshape(-1, 2)
    take = functools.partial(jax.lax.dynamic_slice_in_dim, slice_size=values.shape[0] - 1)
    rounded = jax.jit(tpu_programs.rounded_like_the_product(take))(values, 1)
    with np.errstate(invalid="ignore"):  # NaN stays NaN
        expected = values[1:].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(rounded), expected)
    assert rounded.dtype == jnp.float32


@pytest.mark.parametrize(
    "precision, rounds",
    [(None, True), ("default", True), ("bfloat16", True), ("float32", False), ("highest", False)],
)
def test_only_products_at_one_bfloat16_pass_are_rounded(precision, rounds):
    with jax.default_matmul_precision(precision):
        assert tpu_programs.products_round_to_bfloat16(jnp.float32) is rounds
        assert tpu_programs.products_round_to_bfloat16(jnp.bfloat16) is False


# A [d, V] classifier a TPU stores column-major (V not a multiple of 128, d one): 200 classes.
D_LANES, V_RAGGED = 128, 200


def transposed_classifiers(loss, classifier_shape, platform):
    """The classifier-shaped transposes in the exported ``value_and_grad`` of ``loss``
    (hidden and classifier) for ``platform``, as ``"AxBxf32"`` operand shapes."""
    hidden = jax.ShapeDtypeStruct((64, D_LANES), jnp.float32)
    classifier = jax.ShapeDtypeStruct(classifier_shape, jnp.float32)
    labels = jax.ShapeDtypeStruct((64,), jnp.int32)
    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    text = export.export(program, platforms=[platform])(hidden, classifier, labels).mlir_module()
    found = re.findall(r"stablehlo\.transpose %\S+, dims = \[1, 0\] : \(tensor<(\w+)>\)", text)
    rows, cols = classifier_shape
    return [s for s in found if s in (f"{rows}x{cols}xf32", f"{cols}x{rows}xf32")]


def _dv_distillation(hidden, classifier, labels):
    teacher = (jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(classifier))
    return linear_distillation_loss(hidden, classifier, *teacher, labels=labels,
                                    classifier_layout="dv")  # fmt: skip


def test_classifier_stored_column_major_is_transposed_only_on_the_tpu():
    """jaxsoftmax/tiles/tpu_layout.py: the TPU's program of a [d, V] classifier the TPU stores
    column-major runs on its transpose (in and the gradient out); nothing else does."""
    ragged = (D_LANES, V_RAGGED)
    assert tpu_layout.stored_column_major(*ragged)
    for loss in (_fused("dv"), _dv_distillation):
        on_tpu = transposed_classifiers(loss, ragged, "tpu")
        assert len(on_tpu) >= 2, on_tpu  # the classifier in, its gradient out
        assert transposed_classifiers(loss, ragged, "cpu") == []
        assert transposed_classifiers(loss, ragged, "cuda") == []
    # a classifier the TPU stores row-major is read as it is
    aligned = (D_LANES, 256)
    assert not tpu_layout.stored_column_major(*aligned)
    assert transposed_classifiers(_fused("dv"), aligned, "tpu") == []
    assert transposed_classifiers(_fused("vd"), (V_RAGGED, D_LANES), "tpu") == []


@pytest.mark.parametrize(
    "rows, cols", [(4096, 32064), (4096, 128256), (4100, 32064), (200, 64), (64, 200), (7, 7)]
)
def test_stored_column_major_is_the_order_that_pads_less(rows, cols):
    """Against the padded sizes counted tile by tile (8 x 128), independently of the rule."""
    tiles = lambda major, minor: len(range(0, major, 8)) * len(range(0, minor, 128))
    assert tpu_layout.stored_column_major(rows, cols) == (tiles(cols, rows) < tiles(rows, cols))


@pytest.mark.parametrize("loss_name", ["cross_entropy", "distillation"])
def test_the_transposed_tpu_program_computes_what_the_cpu_program_does(loss_name):
    """The TPU's program on the transposed classifier, run here, at float32 products: the
    loss and gradients of the CPU's program, the classifier's gradient in the layout given.
    200 classes in chunks of 64: the last chunk overlaps the one before."""
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(24, D_LANES)).astype(np.float32) / 8
    classifier = rng.normal(size=(D_LANES, V_RAGGED)).astype(np.float32)
    labels = rng.integers(0, V_RAGGED, 24).astype(np.int32)
    chunks = dict(token_chunk=8, vocab_chunk=64, classifier_layout="dv")
    if loss_name == "cross_entropy":
        loss = functools.partial(linear_cross_entropy, method="recompute", **chunks)
    else:
        teacher = rng.normal(size=classifier.shape).astype(np.float32)

        def loss(h, w, y):
            return linear_distillation_loss(h, w, h[:, ::-1], teacher, labels=y, **chunks)

    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    anywhere = [export.DisabledSafetyCheck.platform()]
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (hidden, classifier, labels)]
    with jax.default_matmul_precision("float32"):  # no bf16 rounding: the layout alone
        exported = export.export(program, platforms=["tpu"], disabled_checks=anywhere)(*shapes)
        assert transposed_classifiers(loss, classifier.shape, "tpu"), "not transposed"
        on_tpu = exported.call(hidden, classifier, labels)
        here = program(hidden, classifier, labels)
    assert on_tpu[1][1].shape == classifier.shape
    for name, got, want in zip(("loss", "d hidden", "d classifier"), jax.tree.leaves(on_tpu),
                               jax.tree.leaves(here)):  # fmt: skip
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6,
                                   err_msg=name)  # fmt: skip

"""The plain rule for GPUs and TPUs, the CPU's fast paths, and their agreement.

The core (``jaxsoftmax/core/rule.py``) is what every platform but the CPU compiles; the CPU gets
``jaxsoftmax/core/cpu_programs.py``, chosen when the program is lowered. These tests export
the training step for each platform (no device of that kind is needed to export) and check
what each one gets, and run both paths on the CPU against each other: the plain path is the
fast path's oracle.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sample

from jaxsoftmax import (
    cross_entropy,
    linear_cross_entropy,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from jaxsoftmax.core import plain_path_only

# This module empties JAX's caches (plain_path_only, jax.clear_caches, the benchmark's cold
# runs), after which every test of the same worker compiles its programs again: its tests run
# together on one worker (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("empties_jax_caches")

N, C, D = 8, 16, 4
WEIGHTS = np.linspace(0.5, 1.5, C, dtype=np.float32)


def integer_targets(dtype):
    return jax.ShapeDtypeStruct((N,), jnp.int32)


def probability_targets(dtype):
    return jax.ShapeDtypeStruct((N, C), dtype)


# name: (loss of (logits, targets), targets' abstract value, what the CPU program carries
# for float32 and for bf16 logits). Each loss is a scalar, as a training step takes it.
LOSSES = {
    "integer": (lambda z, y: cross_entropy(z, y), integer_targets, "scatter", "barrier"),
    "integer_smoothing_weights": (
        lambda z, y: cross_entropy(z, y, label_smoothing=0.1, class_weights=WEIGHTS),
        integer_targets,
        "scatter",
        "barrier",
    ),
    "probabilities": (lambda z, y: cross_entropy(z, y), probability_targets, None, "barrier"),
    "probabilities_smoothing_weights": (
        lambda z, y: cross_entropy(z, y, label_smoothing=0.1, class_weights=WEIGHTS),
        probability_targets,
        None,
        "barrier",
    ),
    "integer_dropin": (
        lambda z, y: jnp.mean(softmax_cross_entropy_with_integer_labels(z, y)),
        integer_targets,
        "scatter",
        "barrier",
    ),
    "probability_dropin": (
        lambda z, y: jnp.mean(softmax_cross_entropy(z, y)),
        probability_targets,
        None,
        "barrier",
    ),
}

METHODS = ("recompute", "forward")


def exported_text(fn, args, platform):
    exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
    return exported.mlir_module()


def training_step(loss):
    return jax.value_and_grad(loss)


@functools.cache
def exported_losses(platform):
    """The exported ``value_and_grad`` of every loss in both dtypes, as StableHLO text."""
    texts = {}
    for name, (loss, targets, *_) in LOSSES.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            args = (jax.ShapeDtypeStruct((N, C), dtype), targets(dtype))
            texts[name, jnp.dtype(dtype).name] = exported_text(training_step(loss), args, platform)
    for method in METHODS:
        for dtype in (jnp.float32, jnp.bfloat16):
            fn = jax.value_and_grad(
                lambda h, w, y, method=method: linear_cross_entropy(
                    h, w, y, method=method, token_chunk=4, vocab_chunk=8
                ),
                argnums=(0, 1),
            )
            args = (
                jax.ShapeDtypeStruct((N, D), dtype),
                jax.ShapeDtypeStruct((C, D), dtype),
                jax.ShapeDtypeStruct((N,), jnp.int32),
            )
            texts[f"linear_{method}", jnp.dtype(dtype).name] = exported_text(fn, args, platform)
    return texts


def ops(text, name):
    return len(re.findall(rf"stablehlo\.{name}\b", text))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerators_get_the_plain_rule(platform):
    """No optimization barrier and no scatter in what a GPU or TPU compiles: the label is a
    compare that fuses into the passes, nothing stops fusion."""
    for key, text in exported_losses(platform).items():
        assert ops(text, "optimization_barrier") == 0, key
        assert ops(text, "scatter") == 0, key


def test_the_cpu_gets_its_fast_paths():
    """Lowered for the CPU, each loss carries its fast path: the label entry by a scatter
    (float32 integer labels) and separate readers behind barriers (bf16 logits)."""
    texts = exported_losses("cpu")
    for name, (*_, float32_marker, bf16_marker) in LOSSES.items():
        for dtype, marker in (("float32", float32_marker), ("bfloat16", bf16_marker)):
            text = texts[name, dtype]
            if marker == "scatter":
                assert ops(text, "scatter") >= 1, (name, dtype)
            elif marker == "barrier":
                assert ops(text, "optimization_barrier") >= 1, (name, dtype)
    for method in METHODS:  # the fused loss: the label entry by a scatter in every tile
        assert ops(texts[f"linear_{method}", "float32"], "scatter") >= 1, method
    # bf16 chunks of the fused loss: each slice of the classifier inside a two-branch
    # conditional on the CPU only, so that only the chunk is widened
    for method in METHODS:
        cpu = texts[f"linear_{method}", "bfloat16"]
        cuda = exported_losses("cuda")[f"linear_{method}", "bfloat16"]
        if method == "recompute":  # the method that slices the classifier
            assert ops(cpu, "case") > ops(cuda, "case")


def test_the_forward_method_sums_a_kernel_layout_gradient_in_rows_only_on_the_cpu():
    """``method="forward"`` with a ``[d, V]`` classifier: on the CPU each token block's
    ``G^T h`` is a ``[V, d]`` product, summed and transposed once (workaround 4 in
    jaxsoftmax/core/cpu_programs.py); a GPU or TPU multiplies ``h^T G`` into ``[d, V]``."""
    n, d, v = 6, 3, 10  # token blocks of 2: z [2, 10], dh [2, 3], dW [3, 10] or [10, 3]
    fn = jax.value_and_grad(
        lambda h, k, y: linear_cross_entropy(
            h, k, y, classifier_layout="dv", method="forward", token_chunk=2
        ),
        argnums=(0, 1),
    )
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    rows_first = rf"stablehlo\.dot_general[^\n]*-> tensor<{v}x{d}xf32>"
    columns_first = rf"stablehlo\.dot_general[^\n]*-> tensor<{d}x{v}xf32>"
    for platform in ("cpu", "cuda", "tpu"):
        text = exported_text(fn, args, platform)
        sums = [bool(re.search(rows_first, text)), bool(re.search(columns_first, text))]
        assert sums == ([True, False] if platform == "cpu" else [False, True]), platform


def compiled_program(fn, *args):
    """The compiled entry computation, with names and metadata left out."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    text = text[text.index("\nENTRY") :]
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r"\w+\.\d+: ", "", text)  # parameter names
    return re.sub(r"%[\w.\-]+", "%_", text)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropins_train_with_the_same_program_as_cross_entropy(dtype):
    """Reverse mode of the drop-ins (a custom_jvp whose tangent is the rule's gradient,
    rematerialized without an optimization barrier) compiles to cross_entropy's program
    (a custom_vjp): the same forward and the same backward, its exponential shared.

    Checked on the plain rule, what GPUs and TPUs compile. On the CPU's fast path the
    float32 integer drop-in scatters the label entries of the gradient for a unit cotangent,
    then multiplies by the cotangent (one more elementwise pass than cross_entropy, whose
    scatter writes the scaled entries); see docs/custom-gradients.md."""
    logits = jax.ShapeDtypeStruct((N, C), dtype)
    labels = integer_targets(dtype)
    probabilities = probability_targets(dtype)
    pairs = (
        (
            lambda z, y: jnp.mean(softmax_cross_entropy_with_integer_labels(z, y)),
            lambda z, y: cross_entropy(z, y, ignore_index=None),  # optax has no padding label
            labels,
        ),
        (
            lambda z, y: jnp.mean(softmax_cross_entropy(z, y)),
            lambda z, y: cross_entropy(z, y),
            probabilities,
        ),
    )
    with plain_path_only():
        for dropin, general, targets in pairs:
            assert compiled_program(training_step(dropin), logits, targets) == compiled_program(
                training_step(general), logits, targets
            )


def assert_trees_close(fast, plain, tolerance):
    """Every case's value and gradients from the two paths agree within ``tolerance``."""
    assert fast.keys() == plain.keys()
    for key in fast:
        for got, want in zip(jax.tree.leaves(fast[key]), jax.tree.leaves(plain[key])):
            np.testing.assert_allclose(
                np.asarray(got, np.float64),
                np.asarray(want, np.float64),
                rtol=tolerance,
                atol=tolerance,
                err_msg=str(key),
            )


# Options each checked alone and all together, for both kinds of target.
OPTION_SETS = {
    "none": {},
    "smoothing": dict(label_smoothing=0.2),
    "weights": dict(class_weights=WEIGHTS),
    "z_loss": dict(z_loss=0.01),
    "softcap": dict(logit_softcap=2.0),
    "class_mask": dict(where="classes"),
    "row_mask": dict(where="rows"),
    "all": dict(
        label_smoothing=0.1, class_weights=WEIGHTS, z_loss=0.01, logit_softcap=3.0, where="rows"
    ),
}


AGREEMENT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@functools.cache
def problems():
    """The inputs of every (dtype, kind), made together once: ``plain_path_only`` empties
    JAX's caches, and each test making its own afterwards compiled the masks' updates again.
    Each dtype gets the same draws, rounded to it. The masks are made with NumPy (no
    program compiled)."""
    integer = sample.integers(12, (N,), 0, C)
    class_mask = np.array(sample.bernoulli(14, 0.7, (N, C)))
    class_mask[:, 0] = True
    class_mask[-1] = False  # and a row with no class
    masks = {"classes": class_mask, "rows": np.arange(N) % 3 != 1}
    return {
        (dtype, kind): (sample.normal(11, (N, C), dtype, scale=3.0), targets, masks)
        for dtype in AGREEMENT_DTYPES
        for kind, targets in (
            ("integer", integer),
            ("probabilities", sample.probabilities(13, (N, C), dtype)),
        )
    }


AGREEMENT_CASES = [
    (dtype, kind) for dtype in AGREEMENT_DTYPES for kind in ("integer", "probabilities")
]


# Each option alone in float32; in bf16 and float16, where the fast paths differ only in
# where they widen to float32, none, the class mask and every other option at once.
HALF_OPTION_SETS = ("none", "class_mask", "all")


def option_sets_for(dtype):
    return OPTION_SETS if dtype == jnp.float32 else HALF_OPTION_SETS


def value_and_gradients():
    """Every (dtype, kind)'s per-row losses and gradients (logits; probabilities too) for
    its option sets (:func:`option_sets_for`), all in one compiled program."""

    def every_option_set(logits, targets, masks, argnums):
        results = {}
        for name in option_sets_for(logits.dtype):
            options = OPTION_SETS[name]
            options = dict(options)
            if "where" in options:
                options["where"] = masks[options["where"]]
            loss = lambda z, y, options=options: jnp.sum(
                cross_entropy(z, y, reduction="none", **options).astype(jnp.float32)
                * jnp.arange(1.0, N + 1.0)
            )
            results[name] = jax.value_and_grad(loss, argnums)(logits, targets)
        return results

    def every_case(problems):
        return [
            every_option_set(*problem, (0,) if kind == "integer" else (0, 1))
            for (_, kind), problem in zip(AGREEMENT_CASES, problems)
        ]

    results = jax.jit(every_case)([problems()[case] for case in AGREEMENT_CASES])
    return dict(zip(AGREEMENT_CASES, results))


@functools.cache
def both_paths():
    """``(fast, plain)``: :func:`value_and_gradients` on the CPU's fast path and on the
    plain path, computed once for every test of the agreement (two programs in all)."""
    fast = value_and_gradients()
    with plain_path_only():
        plain = value_and_gradients()
    return fast, plain


@pytest.mark.parametrize("dtype", AGREEMENT_DTYPES)
@pytest.mark.parametrize("kind", ["integer", "probabilities"])
def test_plain_and_fast_paths_agree_on_the_cpu(dtype, kind):
    fast, plain = both_paths()
    assert sorted(fast[dtype, kind]) == sorted(option_sets_for(dtype))
    assert_trees_close(
        fast[dtype, kind], plain[dtype, kind], 1e-6 if dtype == jnp.float32 else 1e-2
    )


LINEAR_DTYPES = (jnp.float32, jnp.bfloat16)
# The fused loss's option set "all", with its row mask and class weights (arrays, given to
# the program as arguments by linear_problems) for N + 2 rows and C + 3 classes.
EVERY_LINEAR_OPTION = {
    k: v for k, v in OPTION_SETS["all"].items() if k not in ("where", "class_weights")
}


@functools.cache
def linear_problems():
    """As :func:`problems`, for the fused loss: made once, for both dtypes."""
    labels = sample.integers(7, (N + 2,), 0, C + 3)
    # the array options, arguments of the program (the others are static)
    arrays = {
        "where": np.arange(N + 2) % 4 != 0,
        "class_weights": np.linspace(0.5, 1.5, C + 3, dtype=np.float32),
    }
    return {
        dtype: (
            sample.normal(5, (N + 2, D), dtype),
            sample.normal(6, (C + 3, D), dtype),
            labels,
            arrays,
        )
        for dtype in LINEAR_DTYPES
    }


def linear_value_and_gradients():
    """Both dtypes, both methods, without and with every option: one compiled program."""

    def both_methods(hidden, classifier, labels, arrays):
        results = {}
        for method in METHODS:
            for options in ({}, EVERY_LINEAR_OPTION | arrays):
                loss = lambda h, w, method=method, options=options: linear_cross_entropy(
                    h, w, labels, method=method, token_chunk=4, vocab_chunk=8, **options
                ).astype(jnp.float32)
                key = (method, bool(options))
                results[key] = jax.value_and_grad(loss, (0, 1))(hidden, classifier)
        # [d, V]: the CPU sums the forward method's classifier gradient as [V, d]
        for options in ({}, EVERY_LINEAR_OPTION | arrays):
            kernel_loss = lambda h, k, options=options: linear_cross_entropy(
                h, k, labels, classifier_layout="dv", method="forward", token_chunk=4,
                **options,
            ).astype(jnp.float32)  # fmt: skip
            results["forward_dv", bool(options)] = jax.value_and_grad(kernel_loss, (0, 1))(
                hidden, classifier.T
            )
        return results

    results = jax.jit(lambda problems: [both_methods(*p) for p in problems])(
        [linear_problems()[dtype] for dtype in LINEAR_DTYPES]
    )
    return dict(zip(LINEAR_DTYPES, results))


@functools.cache
def linear_both_paths():
    fast = linear_value_and_gradients()
    with plain_path_only():
        plain = linear_value_and_gradients()
    return fast, plain


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
def test_fused_loss_plain_and_fast_paths_agree_on_the_cpu(dtype):
    fast, plain = linear_both_paths()
    assert_trees_close(fast[dtype], plain[dtype], 1e-5 if dtype == jnp.float32 else 2e-2)


def test_plain_path_only_switches_the_program():
    """The switch the agreement tests rely on changes what the CPU compiles."""
    args = (jax.ShapeDtypeStruct((N, C), jnp.float32), integer_targets(jnp.float32))
    fast = jax.jit(training_step(cross_entropy)).lower(*args).as_text()
    with plain_path_only():
        plain = jax.jit(training_step(cross_entropy)).lower(*args).as_text()
    assert ops(fast, "scatter") >= 1
    assert ops(plain, "scatter") == 0


def test_the_core_stays_short_and_plain():
    """The core is the text a learner reads: no function longer than a screen (40 lines), and
    none of one backend's tools (those live in core/cpu_programs.py)."""
    import ast
    import pathlib

    from jaxsoftmax.core import row_terms, rule

    for module in (rule, row_terms):
        source = pathlib.Path(module.__file__).read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                assert node.end_lineno - start + 1 <= 40, node.name
        for word in ("optimization_barrier", "default_backend", "scatter", ".at["):
            assert word not in source, (module.__name__, word)

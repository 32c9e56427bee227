"""linear_cross_entropy against the naive composition (logits, then the core loss)."""

import functools
import math
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import sample

from jaxsoftmax import cross_entropy, linear_cross_entropy
from jaxsoftmax.core import row_terms
from jaxsoftmax.tiles import sizes as tile_sizes
from jaxsoftmax.tiles.sizes import default_chunks

N, D, V = 37, 12, 23  # neither a multiple of the chunks below
CHUNKS = dict(token_chunk=8, vocab_chunk=5)

OPTIONS = {
    "plain": {},
    "label_smoothing": dict(label_smoothing=0.2),
    "class_weights": dict(class_weights="weights"),
    "weights_and_smoothing": dict(class_weights="weights", label_smoothing=0.3),
    "z_loss": dict(z_loss=1e-2),
    "logit_softcap": dict(logit_softcap=2.5),
    "ignore_index": dict(ignore_index=-100),
    "where": dict(where="where"),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "everything": dict(
        class_weights="weights",
        label_smoothing=0.1,
        z_loss=1e-3,
        logit_softcap=3.0,
        ignore_index=-100,
        where="where",
    ),
}


def _inputs(dtype=jnp.float32, batch=(N,), d=D, v=V, seed=0):
    k = sample.split(seed, 7)
    hidden = sample.normal(k[0], batch + (d,), dtype)
    classifier = sample.normal(k[1], (v, d), dtype, scale=3 / math.sqrt(d))
    bias = sample.normal(k[2], (v,), dtype)
    labels = np.asarray(sample.integers(k[3], batch, 0, v))
    labels = np.where(np.asarray(sample.bernoulli(k[4], 0.15, batch)), -100, labels)
    extras = {
        "weights": sample.uniform(k[5], (v,), low=0.5, high=2.0),
        "where": sample.bernoulli(k[6], 0.8, batch),
    }
    return hidden, classifier, bias, jnp.asarray(labels), extras


def _resolve(options, extras, labels):
    kw = {
        name: extras[value] if isinstance(value, str) and value in extras else value
        for name, value in options.items()
    }
    if "ignore_index" not in kw:  # -100 is only a label with ignore_index set
        labels = jnp.asarray(np.where(np.asarray(labels) < 0, 0, labels))
    return kw, labels


def _naive(hidden, classifier, bias, labels, **kw):
    logits = hidden.astype(jnp.float32) @ classifier.astype(jnp.float32).T
    logits = logits + bias.astype(jnp.float32).reshape((1,) * (logits.ndim - 1) + bias.shape)
    return cross_entropy(logits, labels, **kw)


def _value_and_grads(loss, hidden, classifier, bias):
    def scalar(h, w, b):
        out = loss(h, w, b)
        return jnp.sum(
            out * jnp.linspace(0.5, 1.5, out.size, dtype=out.dtype).reshape(out.shape)
        ), out

    (_, out), grads = jax.value_and_grad(scalar, (0, 1, 2), has_aux=True)(hidden, classifier, bias)
    return (out,) + grads


def _assert_cases_close(got, want, **tolerances):
    """Each case of ``got`` (a dict: case -> arrays) against ``want`` (same keys, or a function
    of the key), compared on its own; the failure lists every case that differs, by name."""
    failures = []
    for case, arrays in got.items():
        expected = want(case) if callable(want) else want[case]
        for g, w, what in zip(arrays, expected, OUTPUTS):
            try:
                np.testing.assert_allclose(g, w, **tolerances, err_msg=f"{case} {what}")
            except AssertionError as error:
                failures.append(str(error))
    assert not failures, "\n".join(failures)


OUTPUTS = ["loss", "d_hidden", "d_classifier", "d_bias"]
METHODS = ["recompute", "forward"]
# Option sets compared with the naive composition beside OPTIONS' (by the chunk sizes' test).
REFERENCE_OPTIONS = {**OPTIONS, "smoothing_and_z_loss": dict(label_smoothing=0.1, z_loss=1e-3)}


@functools.cache
def _naive_references(names, dtype=jnp.float32, v=V):
    """``_value_and_grads`` of the naive composition for each option set of REFERENCE_OPTIONS
    in ``names``, on ``_inputs(dtype, v=v)``: one jitted program for all of them."""
    hidden, classifier, bias, labels, extras = _inputs(dtype, v=v)

    def every(h, w, b):
        results = {}
        for name in names:
            kw, y = _resolve(REFERENCE_OPTIONS[name], extras, labels)
            results[name] = _value_and_grads(lambda h, w, b: _naive(h, w, b, y, **kw), h, w, b)
        return results

    return jax.jit(every)(hidden, classifier, bias)


def _fused(name, extras, labels, **chunks):
    kw, labels = _resolve(REFERENCE_OPTIONS[name], extras, labels)
    return lambda h, w, b: linear_cross_entropy(h, w, labels, bias=b, **kw, **chunks)


FLOAT32_NAMES = tuple(sorted(OPTIONS))
# The float32 references of every test, in one program.
REFERENCE_NAMES = tuple(sorted(REFERENCE_OPTIONS))


@pytest.mark.parametrize("method", METHODS)
def test_equals_naive_composition_float32(method):
    """Every option set of OPTIONS under jit, all in one program per method ("forward"
    computes scalar reductions only), each compared on its own with the naive composition."""
    hidden, classifier, bias, labels, extras = _inputs()
    names = [n for n in FLOAT32_NAMES if not (method == "forward" and n == "none")]

    def every(h, w, b):
        return {
            name: _value_and_grads(_fused(name, extras, labels, **CHUNKS, method=method), h, w, b)
            for name in names
        }

    got = jax.jit(every)(hidden, classifier, bias)
    _assert_cases_close(got, _naive_references(REFERENCE_NAMES), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("method", METHODS)
def test_equals_naive_composition_float32_eager(method):
    """Every option at once, called without jit."""
    hidden, classifier, bias, labels, extras = _inputs()
    fused = _fused("everything", extras, labels, **CHUNKS, method=method)
    # jax.vjp with _value_and_grads' weights as a NumPy cotangent: the same gradients, and
    # no eager program of the test's own (a weighted sum) beside the loss's.
    out, pullback = jax.vjp(fused, hidden, classifier, bias)
    weights = np.linspace(0.5, 1.5, out.size, dtype=out.dtype).reshape(out.shape)
    got = {"everything": (out,) + pullback(weights)}
    _assert_cases_close(got, _naive_references(REFERENCE_NAMES), rtol=2e-5, atol=2e-6)


# V = 23 in chunks of 5 ends with a ragged chunk (gradients added into a [V, d] buffer);
# V = 24 in chunks of 6 is tiled exactly (the chunks' gradients stacked by the scan).
BFLOAT16_TILINGS = [(V, 5), (24, 6)]


@pytest.mark.parametrize("method", METHODS)
def test_equals_naive_composition_bfloat16(method):
    """Both tilings of BFLOAT16_TILINGS with "plain" and "everything": one program per
    method for the four cases, each compared on its own."""
    got = {}
    for v, vocab_chunk in BFLOAT16_TILINGS:
        hidden, classifier, bias, labels, extras = _inputs(jnp.bfloat16, v=v)
        chunks = dict(token_chunk=8, vocab_chunk=vocab_chunk, method=method)

        def both(h, w, b):
            return {
                (name, v, vocab_chunk): _value_and_grads(
                    _fused(name, extras, labels, **chunks), h, w, b
                )
                for name in ("plain", "everything")
            }

        got.update(jax.jit(both)(hidden, classifier, bias))
    assert all(g.dtype == jnp.bfloat16 for arrays in got.values() for g in arrays)
    # The reference: the naive composition on the same bf16 numbers, in float32.
    failures = []
    for (name, v, vocab_chunk), arrays in got.items():
        want = _naive_references(("plain", "everything"), jnp.bfloat16, v)[name]
        for g, w, what in zip(arrays, want, OUTPUTS):
            scale = float(np.max(np.abs(w)))
            try:
                np.testing.assert_allclose(
                    np.asarray(g).astype(np.float32),
                    w,
                    rtol=2e-2,
                    atol=1e-2 * scale,
                    err_msg=f"{name} V={v} vocab_chunk={vocab_chunk} {what}",
                )
            except AssertionError as error:
                failures.append(str(error))
    assert not failures, "\n".join(failures)


def test_batch_axes_and_default_chunks():
    hidden, classifier, bias, labels, extras = _inputs(batch=(3, 13))
    labels = jnp.asarray(np.where(np.asarray(labels) < 0, 0, labels))

    def both(h, w, b):
        return {
            "fused": _value_and_grads(
                lambda h, w, b: linear_cross_entropy(h, w, labels, bias=b, reduction="none"),
                h,
                w,
                b,
            ),
            "naive": _value_and_grads(
                lambda h, w, b: _naive(h, w, b, labels, reduction="none"), h, w, b
            ),
        }

    got = jax.jit(both)(hidden, classifier, bias)
    _assert_cases_close({"fused": got["fused"]}, {"fused": got["naive"]}, rtol=2e-5, atol=2e-6)


CHUNK_SIZES = [(1, 1), (37, 23), (64, 64), (36, 22)]


@pytest.mark.parametrize("method", METHODS)
def test_chunk_sizes_do_not_change_the_result(method):
    """Every (token_chunk, vocab_chunk) of CHUNK_SIZES: one program per method."""
    hidden, classifier, bias, labels, extras = _inputs()

    def every(h, w, b):
        return {
            chunks: _value_and_grads(
                _fused(
                    "smoothing_and_z_loss",
                    extras,
                    labels,
                    token_chunk=chunks[0],
                    vocab_chunk=chunks[1],
                    method=method,
                ),
                h,
                w,
                b,
            )
            for chunks in CHUNK_SIZES
        }

    got = jax.jit(every)(hidden, classifier, bias)
    want = _naive_references(REFERENCE_NAMES)["smoothing_and_z_loss"]
    _assert_cases_close(got, lambda case: want, rtol=2e-5, atol=2e-6)


def test_dense_kernel_layout():
    """``classifier_layout="dv"`` with both methods, one program."""
    hidden, classifier, _, labels, _ = _inputs()
    labels = jnp.asarray(np.where(np.asarray(labels) < 0, 0, labels))
    kernel = classifier.T

    def every(h, k):
        results = {
            method: jax.value_and_grad(
                lambda h, k: linear_cross_entropy(
                    h, k, labels, classifier_layout="dv", method=method, **CHUNKS
                ),
                (0, 1),
            )(h, k)
            for method in METHODS
        }
        results["naive"] = jax.value_and_grad(lambda h, k: cross_entropy(h @ k, labels), (0, 1))(
            h, k
        )
        return results

    got = jax.jit(every)(hidden, kernel)
    value_n, (d_hidden_n, d_kernel_n) = got["naive"]
    for method in METHODS:
        value, (d_hidden, d_kernel) = got[method]
        assert d_kernel.shape == kernel.shape, method
        np.testing.assert_allclose(value, value_n, rtol=2e-6, err_msg=method)
        np.testing.assert_allclose(d_hidden, d_hidden_n, rtol=2e-5, atol=2e-6, err_msg=method)
        np.testing.assert_allclose(d_kernel, d_kernel_n, rtol=2e-5, atol=2e-6, err_msg=method)


def test_without_bias_and_with_bfloat16_accumulation():
    """Both methods, float32 and bf16 accumulation, in one program."""
    hidden, classifier, _, labels, _ = _inputs(jnp.bfloat16)
    labels = jnp.asarray(np.where(np.asarray(labels) < 0, 0, labels))

    def every(h, w):
        return {
            (method, jnp.dtype(dt).name): jax.grad(
                lambda h, w: linear_cross_entropy(
                    h, w, labels, accumulation_dtype=dt, method=method, **CHUNKS
                ),
                1,
            )(h, w)
            for method in METHODS
            for dt in (jnp.float32, jnp.bfloat16)
        }

    got = jax.jit(every)(hidden, classifier)
    for method in METHODS:
        g32, g16 = got[method, "float32"], got[method, "bfloat16"]
        assert g32.dtype == g16.dtype == jnp.bfloat16, method
        np.testing.assert_allclose(
            np.asarray(g16).astype(np.float32),
            np.asarray(g32).astype(np.float32),
            atol=2e-2,
            err_msg=method,
        )


def test_class_weights_get_a_zero_gradient_and_bad_labels_give_nan():
    hidden, classifier, _, labels, extras = _inputs()
    labels = np.where(np.asarray(labels) < 0, 0, labels)
    labels[3] = V
    labels = jnp.asarray(labels)
    loss = lambda h, cw: linear_cross_entropy(
        h, classifier, labels, class_weights=cw, reduction="none", **CHUNKS
    )
    grad = jax.grad(lambda h, cw: jnp.sum(loss(h, cw)[:3]), (0, 1))
    out, (d_hidden, d_weights) = jax.device_get(
        jax.jit(lambda h, cw: (loss(h, cw), grad(h, cw)))(hidden, extras["weights"])
    )
    assert np.isnan(out[3]) and np.all(np.isfinite(np.delete(np.asarray(out), 3)))
    assert np.all(d_weights == 0) and np.all(np.isfinite(d_hidden[:3]))


def test_every_example_ignored_gives_zero():
    """Both methods, one program."""
    hidden, classifier, _, _, _ = _inputs()
    labels = jnp.full((N,), -100)

    def every(h):
        return {
            method: jax.value_and_grad(
                lambda h: linear_cross_entropy(
                    h, classifier, labels, ignore_index=-100, method=method, **CHUNKS
                )
            )(h)
            for method in METHODS
        }

    for method, (value, grad) in jax.jit(every)(hidden).items():
        assert float(value) == 0.0 and np.all(grad == 0), method


def _largest_intermediate(jaxpr):
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    largest = max(largest, _largest_intermediate(sub.jaxpr))
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    largest = max(largest, _largest_intermediate(sub))
    return largest


def _outer_scan_lengths(jaxpr):
    """The lengths of the scans not inside another scan, anywhere in ``jaxpr``."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["length"])
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _outer_scan_lengths(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _outer_scan_lengths(sub)
    return found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_hidden_states_alone_are_differentiated_token_chunk_by_token_chunk(dtype):
    """Differentiated with respect to the hidden states alone (a frozen classifier and bias),
    the backward is the token-outer pass only: every loop outside another loops over the
    token chunks (5 of them here, against 3 vocabulary chunks), and ``dh`` is the naive
    composition's, with every option and ragged chunks. With the bias differentiated too the
    vocabulary-outer pass runs again."""
    hidden, classifier, bias, labels, extras = _inputs(dtype)
    kw, labels = _resolve(OPTIONS["everything"], extras, labels)
    chunks = dict(token_chunk=8, vocab_chunk=10, method="recompute")  # N 37, V 23: ragged

    def loss(h, w, b, fused=True):
        if fused:
            return linear_cross_entropy(h, w, labels, bias=b, **kw, **chunks)
        return _naive(h, w, b, labels, **kw)

    hidden_only = jax.grad(loss, argnums=0)
    assert set(
        _outer_scan_lengths(jax.make_jaxpr(hidden_only)(hidden, classifier, bias).jaxpr)
    ) == {5}
    with_bias = jax.make_jaxpr(jax.grad(loss, argnums=(0, 2)))(hidden, classifier, bias)
    assert set(_outer_scan_lengths(with_bias.jaxpr)) == {3, 5}
    got = jax.jit(hidden_only)(hidden, classifier, bias)
    want = jax.jit(jax.grad(functools.partial(loss, fused=False)))(hidden, classifier, bias)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), **tolerance
    )


@pytest.mark.parametrize("method, token_chunk", [("recompute", 16), ("forward", 8)])
def test_no_array_of_size_n_by_v_is_built(method, token_chunk):
    n, d, v = 64, 8, 96
    hidden, classifier, bias, labels, _ = _inputs(batch=(n,), d=d, v=v)
    labels = jnp.asarray(np.where(np.asarray(labels) < 0, 0, labels))
    loss = lambda h, w, b: linear_cross_entropy(
        h,
        w,
        labels,
        bias=b,
        label_smoothing=0.1,
        token_chunk=token_chunk,
        vocab_chunk=32,
        method=method,
    )
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2)))(hidden, classifier, bias)
    assert _largest_intermediate(jaxpr.jaxpr) < n * v / 4
    naive = lambda h, w, b: _naive(h, w, b, labels)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(naive, (0, 1, 2)))(hidden, classifier, bias)
    assert _largest_intermediate(jaxpr.jaxpr) >= n * v  # the check sees the naive logits


def _temp_bytes(loss, n, d, v, dtype, layout="vd"):
    s = jax.ShapeDtypeStruct
    classifier = s((v, d) if layout == "vd" else (d, v), dtype)
    compiled = (
        jax.jit(jax.value_and_grad(loss, (0, 1)))
        .lower(s((n, d), dtype), classifier, s((n,), jnp.int32))
        .compile()
    )
    return compiled.memory_analysis().temp_size_in_bytes


@functools.cache
def _naive_temp_bytes(n, d, v, dtype):
    """The logits + loss path's temporary bytes, compiled once per shape and dtype."""
    return _temp_bytes(lambda h, w, y: cross_entropy(h @ w.T, y), n, d, v, dtype)


# The memory tests share the naive path's compilations (_naive_temp_bytes): one worker.
MEMORY_TESTS = pytest.mark.xdist_group("linear_cross_entropy_memory")


def memory_bound(n, d, token_chunk, vocab_chunk):
    """Temporary bytes allowed: a few logit tiles plus the float32 accumulators.

    ``4 T Vc`` float32 tiles (logits, gradient, their products), ``2 N d`` for ``dh``
    (float32, and its cast), ``2 Vc d`` for one chunk of ``dW`` and 1 MiB of scalars. Nothing
    of the classifier's size: not for bf16 on the CPU either, whose XLA backend would convert
    the whole classifier to float32 if the loss did not slice it first (see ``_slice``).
    """
    tile = token_chunk * vocab_chunk * 4
    return 4 * tile + 2 * n * d * 4 + 2 * vocab_chunk * d * 4 + 2**20


@MEMORY_TESTS
@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("vocab_chunk", [2048, 2500])  # ragged last chunk; 40 exact chunks
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_temporary_memory_is_bounded_by_the_chunks(dtype, vocab_chunk, layout):
    n, d, v, tc = 4096, 128, 100_000, 256
    fused = _temp_bytes(
        lambda h, w, y: linear_cross_entropy(
            h,
            w,
            y,
            token_chunk=tc,
            vocab_chunk=vocab_chunk,
            classifier_layout=layout,
            method="recompute",
        ),
        n,
        d,
        v,
        dtype,
        layout,
    )
    bound = memory_bound(n, d, tc, vocab_chunk)
    naive = _naive_temp_bytes(n, d, v, dtype)
    assert fused <= bound, (fused, bound)
    # The bound is far below the naive N x V path, and below one float32 classifier.
    assert naive > 2 * bound, (naive, bound)
    assert bound < 4 * v * d, (bound, 4 * v * d)


def _forward_memory_bound(n, d, v, block, dtype):
    """``method="forward"``: five ``[T, V]`` float32 blocks (logits, gradient, its casts), the ``[V, d]`` accumulator
    (float32) and, for bf16 on the CPU, the float32 copy of the classifier its products use;
    ``2 N d`` for ``dh`` and 1 MiB of scalars."""
    bound = 5 * block * v * 4 + 4 * v * d + 2 * n * d * 4 + 2**20
    if jax.default_backend() == "cpu" and jnp.dtype(dtype).itemsize < 4:
        bound += 4 * v * d
    return bound


@MEMORY_TESTS
@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_method_temporary_memory_is_bounded_by_the_blocks(dtype, layout):
    n, d, v, block = 4096, 128, 100_000, 40
    fused = _temp_bytes(
        lambda h, w, y: linear_cross_entropy(
            h, w, y, token_chunk=block, classifier_layout=layout, method="forward"
        ),
        n,
        d,
        v,
        dtype,
        layout,
    )
    bound = _forward_memory_bound(n, d, v, block, dtype)
    naive = _naive_temp_bytes(n, d, v, dtype)
    assert fused <= bound, (fused, bound)
    assert naive > 2 * bound, (naive, bound)


def _count_products(loss, n, d, v, platform=None):
    """Matrix products in the lowered program of the loss and its two gradients, for this
    machine or for ``platform`` (``jax.export``: the program that platform gets)."""
    s = jax.ShapeDtypeStruct
    args = s((n, d), jnp.float32), s((v, d), jnp.float32), s((n,), jnp.int32)
    step = jax.jit(jax.value_and_grad(loss, (0, 1)))
    if platform is None:
        return step.lower(*args).as_text().count("stablehlo.dot_general")
    exported = jax.export.export(step, platforms=[platform])(*args)
    return exported.mlir_module().count("stablehlo.dot_general")


def test_forward_method_does_three_products_and_auto_chooses_by_size_and_platform():
    n, d = 64, 16
    small = 2**10  # V d = 2**14: "auto" computes the gradients in the forward
    large = 2**26 // d + 1  # V d just above 2**26: "auto" recomputes
    count = lambda v, **kw: _count_products(
        lambda h, w, y: jnp.sum(linear_cross_entropy(h, w, y, **kw)), n, d, v
    )
    assert count(small, method="forward") == 3  # z = h W^T, dh = G W, dW = G^T h
    assert count(small, method="recompute") == 4  # the logits twice
    assert count(small) == 3
    assert count(small, reduction="sum") == 3
    assert count(small, reduction="none") == 4  # per-row cotangents: recompute
    assert count(large) == 4
    assert count(large, method="forward") == 3
    for accelerator in ("cuda", "tpu"):  # "auto" is "recompute" there, for the memory
        assert (
            _count_products(
                lambda h, w, y: jnp.sum(linear_cross_entropy(h, w, y)), n, d, small, accelerator
            )
            == 4
        )
        assert (
            _count_products(
                lambda h, w, y: jnp.sum(linear_cross_entropy(h, w, y, method="forward")),
                n,
                d,
                small,
                accelerator,
            )
            == 3
        )


def test_forward_method_needs_a_scalar_reduction():
    hidden, classifier, _, labels, _ = _inputs()
    with pytest.raises(ValueError, match='method="forward" needs reduction'):
        linear_cross_entropy(hidden, classifier, labels, reduction="none", method="forward")
    with pytest.raises(ValueError, match="method must be one of"):
        linear_cross_entropy(hidden, classifier, labels, method="fast")


def test_methods_agree_on_every_gradient_including_class_weights():
    """Every option at once, and the class weights' gradient (zero in both: not trained)."""
    hidden, classifier, bias, labels, extras = _inputs()
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, **CHUNKS)

    def grads(h, w, b, cw):
        return {
            method: jax.value_and_grad(
                lambda h, w, b, cw: linear_cross_entropy(
                    h, w, labels, bias=b, class_weights=cw, method=method, **kw
                ),
                (0, 1, 2, 3),
            )(h, w, b, cw)
            for method in METHODS
        }

    got = jax.jit(grads)(hidden, classifier, bias, extras["weights"])
    (v_f, g_f), (v_r, g_r) = got["forward"], got["recompute"]
    np.testing.assert_allclose(v_f, v_r, rtol=1e-6)
    for a, b, what in zip(g_f, g_r, ["hidden", "classifier", "bias", "class_weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=what)


def test_forward_method_with_no_tokens():
    """Both scalar reductions, one program."""
    _, classifier, _, _, _ = _inputs()
    hidden, labels = jnp.zeros((0, D)), jnp.zeros((0,), jnp.int32)

    def every(w):
        return {
            reduction: jax.value_and_grad(
                lambda w: linear_cross_entropy(
                    hidden, w, labels, reduction=reduction, method="forward"
                )
            )(w)
            for reduction in ("mean", "sum")
        }

    for reduction, (value, grad) in jax.jit(every)(classifier).items():
        assert float(value) == 0.0 and np.all(grad == 0), reduction


@pytest.mark.parametrize("platform", ["cpu", "cuda", "rocm", "tpu", "metal"])
def test_default_chunks_follow_the_documented_rule(platform):
    """Against the rule as docs and docstring state it, found by brute force: ``T = min(N,
    T_max)``; ``Vc = V`` up to ``Vc_max``, else the largest divisor of ``V`` in
    ``[Vc_max / 2, Vc_max]`` (on a TPU a multiple of 128), else ``Vc_max``."""
    t_max, v_max = tile_sizes.TILES.get(platform, tile_sizes.TILES["cpu"])
    lanes = 128 if platform == "tpu" else 1
    for n in (1, 7, t_max, 3 * t_max + 5):
        for v in (1, 5, v_max, v_max + 1, 256000, 50257, 128256, 50304, 151936, 262144):
            divisors = [
                c for c in range(1, v_max + 1) if v % c == 0 and 2 * c >= v_max and c % lanes == 0
            ]
            expected = v if v <= v_max else max(divisors, default=v_max)
            assert default_chunks(n, v, platform) == (min(n, t_max), expected), (n, v)
    # Gemma 2 (256000 = 250 * 1024) and GPT-2 padded to 50304 = 2**7 * 393 tile exactly.
    assert default_chunks(8192, 256000, platform)[1] in (1024, 2048)
    # On a TPU 50304's divisors in range (524, 786) cut its 128 lanes: 1024, ragged.
    gpt2 = default_chunks(8192, 50304, platform)[1]
    assert gpt2 == 1024 if platform == "tpu" else 50304 % gpt2 == 0


def _dot_shapes(text):
    """Result shapes ``(rows, cols)`` of the 2-D matrix products in StableHLO text."""
    found = re.findall(r"stablehlo.dot_general.*-> tensor<([0-9]+)x([0-9]+)x", text)
    return {(int(a), int(b)) for a, b in found}


def test_each_backend_lowers_its_own_tile():
    """The tile is chosen when the program is lowered: one exported for ``cuda`` from this
    CPU holds the GPU's ``[1024, 2048]`` tiles of logits, one for ``cpu`` and ``tpu`` the
    ``[1024, 1024]`` ones; chunks the caller gives are used on every backend."""
    n, d, v = 2048, 8, 8192
    s = jax.ShapeDtypeStruct
    args = (s((n, d), jnp.float32), s((v, d), jnp.float32), s((n,), jnp.int32))

    def exported(platform, **chunks):
        loss = lambda h, w, y: linear_cross_entropy(h, w, y, method="recompute", **chunks)
        fn = jax.jit(jax.value_and_grad(loss, (0, 1)))
        return _dot_shapes(jax.export.export(fn, platforms=[platform])(*args).mlir_module())

    for platform in ("cpu", "cuda", "tpu"):
        tile = tile_sizes.TILES[platform]
        other = (1024, 3072 - tile[1])
        assert tile in exported(platform) and other not in exported(platform), platform
        assert (512, 256) in exported(platform, token_chunk=512, vocab_chunk=256)


def test_gemma_shape_temporary_memory_is_300_times_below_the_logits():
    """Gemma 2 2B's shape (N 8192, d 2304, V 256000), loss and both gradients, compiled for
    this CPU: the fused loss's temporary memory at least 300 times below the logits + loss
    path's in float32 (49 MiB against 15.6 GiB), and within the documented budget (see
    ``_tiles``) in float32 and bf16: ``2 T Vc`` logits and their gradient, ``3 Vc d``
    classifier chunk, its gradient and a product, ``3 T d`` of hidden states, in float32,
    and 2 MiB of rows; in bf16 too, where the hidden states' gradient is summed per token
    chunk (no ``N d`` float32 sum: 72 MiB here, 100.6 MiB in all before)."""
    n, d, v = 8192, 2304, 256000
    t, vc = default_chunks(n, v)
    fused = lambda h, w, y: linear_cross_entropy(h, w, y)
    naive = lambda h, w, y: cross_entropy(h @ w.T, y)
    budget = 4 * (2 * t * vc + 3 * vc * d + 3 * t * d) + 2**21
    fused_bytes = {
        dtype: _temp_bytes(fused, n, d, v, dtype) for dtype in (jnp.float32, jnp.bfloat16)
    }
    for dtype, used in fused_bytes.items():
        assert used <= budget, (dtype, used, budget)
    assert _temp_bytes(naive, n, d, v, jnp.float32) >= 300 * fused_bytes[jnp.float32]


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda h, w, y: linear_cross_entropy(h, w.T, y), ValueError, "classifier_layout='dv'"),
        (
            lambda h, w, y: linear_cross_entropy(h, w, y, classifier_layout="kd"),
            ValueError,
            "classifier_layout",
        ),
        (
            lambda h, w, y: linear_cross_entropy(h, w.astype(jnp.bfloat16), y),
            TypeError,
            "hidden's dtype",
        ),
        (lambda h, w, y: linear_cross_entropy(h, w, y.astype(jnp.float32)), TypeError, "labels"),
        (lambda h, w, y: linear_cross_entropy(h, w, y[:-1]), ValueError, "labels"),
        (lambda h, w, y: linear_cross_entropy(h, w, y, bias=jnp.zeros(3)), ValueError, "bias"),
        (
            lambda h, w, y: linear_cross_entropy(h, w, y, where=jnp.ones((N, V), bool)),
            ValueError,
            "N x V",
        ),
        (lambda h, w, y: linear_cross_entropy(h, w, y, token_chunk=0), ValueError, "token_chunk"),
        (lambda h, w, y: linear_cross_entropy(h, w, y, vocab_chunk=2.5), TypeError, "vocab_chunk"),
        (
            lambda h, w, y: linear_cross_entropy(h, w, y, label_smoothing=2.0),
            ValueError,
            "label_smoothing",
        ),
        (
            lambda h, w, y: linear_cross_entropy(h, w, y, accumulation_dtype=jnp.int32),
            TypeError,
            "accumulation_dtype",
        ),
        (lambda h, w, y: linear_cross_entropy(h.astype(jnp.int32), w, y), TypeError, "hidden"),
    ],
)
def test_errors_name_the_argument(call, error, words):
    hidden, classifier, _, labels, _ = _inputs()
    with pytest.raises(error, match=words.replace("(", r"\(")):
        call(hidden, classifier, labels)


def test_rule_class_block_matches_whole_row():
    """The rule on a chunk of classes equals that chunk of the rule on the whole row."""
    logits = sample.normal(3, (5, 11))
    labels = jnp.array([0, 4, 7, 10, 5])
    weights = sample.uniform(4, (11,), low=0.5, high=1.5)
    options = row_terms.RuleOptions(label_smoothing=0.2, z_loss=0.01, logit_softcap=4.0)
    g = jnp.asarray(np.arange(1.0, 6.0, dtype=np.float32))
    block = row_terms.ClassBlock(4, 11, weights)

    def whole_and_part(logits, labels, weights, g):
        _, stats = row_terms.forward(logits, labels, None, weights, None, options)
        whole = row_terms.logits_gradient(logits, labels, None, weights, None, stats, g, options)
        part = row_terms.logits_gradient(
            logits[:, 4:8], labels, None, weights[4:8], None, stats, g, options, block
        )
        return whole, part

    whole, part = jax.jit(whole_and_part)(logits, labels, weights, g)
    np.testing.assert_allclose(part, whole[:, 4:8], rtol=1e-6, atol=1e-7)


def test_vmap_gives_each_batch_its_own_cotangent():
    """Under ``vmap`` a scalar loss per batch element gets its own cotangent: the forward
    method's stored gradients must be scaled per element, not by one number. Both methods
    and the naive composition in one program."""
    hidden = sample.normal(7, (3, 10, 8))
    classifier = sample.normal(8, (13, 8))
    labels = sample.integers(9, (3, 10), 0, 13)
    weights = jnp.array([0.5, 2.0, -1.0])  # distinct cotangents per batch element
    losses = {
        method: functools.partial(linear_cross_entropy, method=method, token_chunk=4)
        for method in METHODS
    }
    losses["naive"] = lambda h, w, y: cross_entropy(h @ w.T, y)

    def total(loss, h, w):
        return jnp.sum(weights * jax.vmap(loss, in_axes=(0, None, 0))(h, w, labels))

    def every(h, w):
        return {
            name: jax.grad(lambda h, w: total(loss, h, w), (0, 1))(h, w)
            for name, loss in losses.items()
        }

    got = jax.jit(every)(hidden, classifier)
    for method in METHODS:
        for g, w, what in zip(got[method], got["naive"], ["hidden", "classifier"]):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{method} {what}")

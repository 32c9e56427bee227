"""linear_distillation_loss: the fused loss against the unfused one on the logits.

The unfused :func:`jaxsoftmax.distillation_loss` is itself tested against float64 NumPy,
the naive compositions and optax (tests/test_distillation.py); here every option of the
fused loss, with ragged tiles, must give its value and all six gradients (both models'
hidden states, classifiers and biases). The sharded loss is checked on 8 devices in
tests/multidevice/check_sharded_linear.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import sample

from jaxsoftmax import distillation_loss, linear_distillation_loss
from jaxsoftmax.core import divergences

N, V, D_S, D_T = 11, 13, 4, 6  # ragged against the tiles below: 11 = 4 + 4 + 3, 13 = 5 + 5 + 3
LABELS = np.array([0, 3, 12, -100, 2, 5, 7, 7, 1, 11, -100])
MASK = np.arange(V) < 11
CASES = {
    "forward_kl_hard_ignore_bias": dict(temperature=2.0, labels=LABELS, hard_weight=0.5,
                                        ignore_index=-100, bias=True),
    "reverse_kl_hard_mask_where_dv_sum": dict(
        divergence="reverse_kl", labels=np.where(LABELS < 11, LABELS, 0).clip(0),
        hard_weight=0.3, vocab_mask=MASK, where=np.arange(N) % 3 > 0,
        classifier_layout="dv", reduction="sum"),
    "jsd_mask_bias_none": dict(divergence="jsd", beta=0.3, temperature=1.5, vocab_mask=MASK,
                               bias=True, reduction="none"),
    "jsd_hard_dv": dict(divergence="jsd", temperature=0.5, labels=LABELS.clip(0),
                        hard_weight=1.0, classifier_layout="dv"),
}  # fmt: skip


def _models(dtype=jnp.float64, layout="vd", scale=1.0, seed=0):
    """NumPy arrays (jnp.asarray would compile a copying program per shape and dtype)."""
    keys = sample.split(seed, 6)
    normal = lambda k, shape: sample.numpy_normal(k, shape, dtype, scale=scale)
    classifier = lambda k, d: normal(k, (V, d) if layout == "vd" else (d, V))
    return (
        normal(keys[0], (N, D_S)), classifier(keys[1], D_S), normal(keys[2], (V,)),
        normal(keys[3], (N, D_T)), classifier(keys[4], D_T), normal(keys[5], (V,)),
    )  # fmt: skip


def _pair(options, token_chunk=4, vocab_chunk=5):
    """The fused loss and the unfused loss of the same options, as functions of the six
    arrays (biases ignored without ``bias=True``)."""
    options = dict(options)  # NumPy arrays stay NumPy: constants of the programs that use them
    bias = options.pop("bias", False)
    layout = options.get("classifier_layout", "vd")
    logits_options = {k: x for k, x in options.items() if k != "classifier_layout"}

    def fused(h_s, w_s, b_s, h_t, w_t, b_t):
        return linear_distillation_loss(
            h_s, w_s, h_t, w_t, student_bias=b_s if bias else None,
            teacher_bias=b_t if bias else None, token_chunk=token_chunk,
            vocab_chunk=vocab_chunk, **options,
        )  # fmt: skip

    def unfused(h_s, w_s, b_s, h_t, w_t, b_t):
        logits = lambda h, w, b: (
            (h @ (w.T if layout == "vd" else w)) + (b[None, :] if bias else 0.0)
        )
        return distillation_loss(logits(h_s, w_s, b_s), logits(h_t, w_t, b_t), **logits_options)

    return fused, unfused


def test_fused_equals_unfused():
    """Value and the six gradients (a random cotangent for ``"none"``), float64: every case
    of CASES, fused and unfused, in one program; each compared on its own."""
    with jax.enable_x64(True):
        inputs = {}
        for case, options in CASES.items():
            arrays = _models(layout=options.get("classifier_layout", "vd"))
            shape = jax.eval_shape(_pair(options)[0], *arrays)
            inputs[case] = (arrays, sample.numpy_normal(5, shape.shape, shape.dtype))

        def every(inputs):
            results = {}
            for case, (arrays, cotangent) in inputs.items():
                results[case] = []
                for loss in _pair(CASES[case]):
                    value, vjp = jax.vjp(loss, *arrays)
                    results[case].append((value, vjp(cotangent)))
            return results

        results = jax.jit(every)(inputs)
    for case, ((value, grads), (expected, want_grads)) in results.items():
        np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12, err_msg=case)
        names = ("h_s", "w_s", "b_s", "h_t", "w_t", "b_t")
        for got, want, name in zip(grads, want_grads, names):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"{case} {name}")


def test_a_frozen_teacher_costs_no_gradient_products():
    """The student's gradients alone equal the unfused ones, and the program holds fewer
    matrix products than the one that also differentiates the teacher."""
    arrays = _models(jnp.float32)
    fused, unfused = _pair(dict(temperature=2.0))
    student_only = jax.jit(jax.grad(fused, (0, 1)))
    both = jax.jit(lambda *a: (jax.grad(fused, (0, 1))(*a), jax.grad(unfused, (0, 1))(*a)))
    for got, want in zip(*both(*arrays)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    products = lambda f: f.lower(*arrays).as_text().count("stablehlo.dot_general")
    assert products(student_only) < products(jax.jit(jax.grad(fused, (0, 1, 3, 4))))


def test_gradients_run_through_the_derived_rule(monkeypatch):
    """Doubling the rule's gradient tiles doubles the fused loss's gradients: the backward is
    the derived rule, not autodiff of the forward loop. (The fused loss is first traced here,
    under the patch, with tiles no other test uses; the reference is the naive composition.)"""
    h_s, w_s, _, h_t, w_t, _ = _models(jnp.float32, seed=3)
    rule = divergences.logits_gradients
    monkeypatch.setattr(
        divergences,
        "logits_gradients",
        lambda *a, **k: tuple(None if g is None else 2 * g for g in rule(*a, **k)),
    )
    fused = lambda h_s, w_s, h_t, w_t: linear_distillation_loss(
        h_s, w_s, h_t, w_t, divergence="reverse_kl", token_chunk=3, vocab_chunk=7
    )

    def naive(h_s, w_s, h_t, w_t):
        log_p, log_q = jax.nn.log_softmax(h_s @ w_s.T), jax.nn.log_softmax(h_t @ w_t.T)
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))

    arrays = (h_s, w_s, h_t, w_t)
    doubled, want_grads = jax.device_get(
        jax.jit(lambda *a: (jax.grad(fused, (0, 1, 2, 3))(*a), jax.grad(naive, (0, 1, 2, 3))(*a)))(
            *arrays
        )
    )
    for got, want in zip(doubled, want_grads):
        np.testing.assert_allclose(got, 2 * want, rtol=1e-4, atol=1e-6)


def test_small_divergence_between_large_logits_is_not_lost():
    """Logits near 2048 (a bias), the teacher's 0.1 from the student's: the online cross
    term, kept relative to the running maxima, gives the float64 KL within 1% (the direct
    ``A / s_b - lse(b) + lse(a)`` subtracts numbers near 2048, whose float32 spacing, 2.4e-4,
    is not small next to the KL)."""
    h_s, w_s, _, _, _, _ = _models(jnp.float32)
    offset = np.full((V,), 2048.0, np.float32)
    w_t = w_s + sample.numpy_normal(9, w_s.shape, scale=0.1)
    f64 = lambda x: np.asarray(x, np.float64)
    divergences_ = ("forward_kl", "reverse_kl")

    def both(h_s, w_s, w_t):
        return {
            divergence: linear_distillation_loss(
                h_s,
                w_s,
                h_s,
                w_t,
                divergence=divergence,
                student_bias=offset,
                teacher_bias=offset,
                token_chunk=4,
                vocab_chunk=5,
            )  # fmt: skip
            for divergence in divergences_
        }

    values = jax.jit(both)(h_s, w_s, w_t)
    for divergence in divergences_:
        expected = reference.distillation(
            f64(h_s) @ f64(w_s).T + 2048.0, f64(h_s) @ f64(w_t).T + 2048.0, divergence=divergence
        )
        assert 1e-4 < expected < 1e-1
        np.testing.assert_allclose(values[divergence], expected, rtol=0.01, err_msg=divergence)


def test_bfloat16_and_no_tokens():
    """bf16 inputs: computed in float32, the loss and gradients (both models': the hidden
    states' from the token-outer pass, ragged token chunks) in bf16 close to the unfused
    loss's; no tokens: a mean of 0 and zero gradients."""
    arrays = [x.astype(jnp.bfloat16) for x in _models(jnp.float32)]
    empty = [x[:0] if x.shape[0] == N else x for x in _models(jnp.float32)]
    fused, unfused = _pair(dict(divergence="jsd", temperature=2.0))

    def every(arrays, empty):
        return (
            jax.value_and_grad(fused, (0, 1, 2, 3))(*arrays),
            jax.value_and_grad(unfused, (0, 1, 2, 3))(*arrays),
            jax.value_and_grad(fused, (0, 1))(*empty),
        )

    (value, grads), (want, want_grads), empty_results = jax.device_get(
        jax.jit(every)(arrays, empty)
    )
    assert value.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    f32 = lambda x: np.asarray(x).astype(np.float32)
    np.testing.assert_allclose(f32(value), f32(want), rtol=1e-2)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(f32(got), f32(expected), rtol=5e-2, atol=2e-3)
    value, grads = empty_results
    assert value == 0 and not np.any(grads[1])


def _temp_bytes(loss, argnums, n, d, v, dtype=jnp.float32):
    s = jax.ShapeDtypeStruct
    shapes = (s((n, d), dtype), s((v, d), dtype)) * 2
    compiled = jax.jit(jax.value_and_grad(loss, argnums)).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_gemma_shape_temporary_memory_is_50_times_below_the_logits():
    """N 8192, d 2304, V 256000 for both models, float32, compiled for this CPU: the fused
    loss with the student's gradients (a frozen teacher) needs 550 times less temporary
    memory than both logits + the unfused loss (58 MiB against 31 GiB) and, with the
    teacher's too, 375 times; the issue asks for 50. Budgets: 64 and 96 MiB."""
    n, d, v = 8192, 2304, 256000
    fused = lambda h_s, w_s, h_t, w_t: linear_distillation_loss(h_s, w_s, h_t, w_t,
                                                                temperature=2.0)  # fmt: skip
    unfused = lambda h_s, w_s, h_t, w_t: distillation_loss(h_s @ w_s.T, h_t @ w_t.T,
                                                           temperature=2.0)  # fmt: skip
    for argnums, budget in (((0, 1), 64), ((0, 1, 2, 3), 96)):
        ours = _temp_bytes(fused, argnums, n, d, v)
        assert ours <= budget * 2**20, (argnums, ours / 2**20)
        assert _temp_bytes(unfused, argnums, n, d, v) >= 50 * ours


BAD_CALLS = [
    (dict(teacher_classifier=lambda w: w[:-1]), ValueError, "the student's vocabulary"),
    (dict(teacher_hidden=lambda h: h[:-1]), ValueError, "the student's tokens"),
    (dict(student_classifier=lambda w: w.astype(jnp.bfloat16)), TypeError, "student_hidden's"),
    (dict(student_classifier=lambda w: w.T), ValueError, "student_classifier must have shape"),
    (dict(student_bias=jnp.zeros(3)), ValueError, "student_bias"),
    (dict(labels=jnp.zeros((N, 1), jnp.int32), hard_weight=1.0), ValueError, "labels"),
    (dict(where=jnp.ones((N, V), bool)), ValueError, "vocab_mask"),
    (dict(hard_weight=0.5), ValueError, "labels is None"),
    (dict(divergence="jsd", beta=0.0), ValueError, "forward_kl"),
    (dict(classifier_layout="kd"), ValueError, "classifier_layout"),
    (dict(token_chunk=0), ValueError, "token_chunk"),
    (dict(vocab_mask=jnp.ones(V, jnp.int32)), ValueError, "vocab_mask"),
]


@pytest.mark.parametrize("change, error, words", BAD_CALLS)
def test_bad_input_raises_a_clear_error(change, error, words):
    # NumPy arrays: the changes below (slices, casts) compile no programs
    h_s, w_s, _, h_t, w_t, _ = (np.asarray(x) for x in _models(jnp.float32))
    arguments = dict(student_hidden=h_s, student_classifier=w_s, teacher_hidden=h_t,
                     teacher_classifier=w_t)  # fmt: skip
    for name, value in change.items():
        arguments[name] = value(arguments[name]) if callable(value) else value
    with pytest.raises(error, match=words):
        linear_distillation_loss(**arguments)


def test_benchmark_script_checks_times_and_reports(tmp_path, monkeypatch):
    """experiments/benchmark_distillation.py on a tiny shape: the competitors agree, the
    timed and memory rows carry every competitor and ratio, and the table is written; a
    wrong competitor is reported as disagreeing."""
    import importlib.util
    import pathlib
    import sys

    folder = pathlib.Path(__file__).resolve().parents[1] / "experiments"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("benchmark_distillation",
                                                  folder / "benchmark_distillation.py")  # fmt: skip
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shape = (16, 8, 12, 40)
    # The timing harness is harness.time_rounds (tests/test_benchmark.py); here a stand-in
    # with fixed seconds, to check what the case makes of them.
    rounds = [{"fused": 1.0, "logits + ours": 2.0}, {"fused": 1.0, "logits + ours": 4.0}]
    monkeypatch.setattr(script.harness, "time_rounds", lambda callables, repeats: rounds)
    # The script's own inputs, drawn in one program instead of an eager one per operation.
    monkeypatch.setattr(script, "inputs", jax.jit(script.inputs, static_argnums=range(5)))
    timed = script.case_time(shape, jnp.float32, "jsd", repeats=1)
    assert timed["fused / logits + ours"] == 1.0 / 3.0  # medians 1 and 3
    assert timed["agree"] and set(timed["seconds"]) == {"fused", "logits + ours"}
    memory = script.case_memory(shape, jnp.float32, "forward_kl")
    assert set(memory["temp_bytes"]) == {"fused", "logits + ours", "logits + optax"}
    meta = dict(device="cpu", jax="x", optax="x", python="x", command="c")
    script.write_markdown(tmp_path / "results.md", meta, [memory, timed])
    text = (tmp_path / "results.md").read_text()
    assert "| (16, 8, 12, 40) | float32 | jsd | True |" in text
    results = {n: (np.zeros(()), (np.ones((2,)),)) for n in ("a", "b")}  # NumPy: no programs
    results["b"] = (np.zeros(()), (2 * np.ones((2,)),))
    assert not script.harness.agree(results, jnp.float32)
    for sibling in ("harness", "common"):  # the helper modules it imported, not the suite's
        sys.modules.pop(sibling, None)

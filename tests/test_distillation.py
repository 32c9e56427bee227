"""distillation_loss: values and both logits' gradients against independent references.

References: float64 NumPy from the definitions (tests/reference.py), ``jax.grad`` and
``jax.jvp`` of the naive compositions written with ``jax.nn.log_softmax``, optax's
``kl_divergence`` and ``convex_kl_divergence``, and finite differences in both modes.
Where a test compiles several functions, they share one program (each case checked on its
own): compiling, not running, is almost all of this file's time.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import sample

from jaxsoftmax import distillation_loss
from jaxsoftmax.core import divergences

FILL = -1e30  # a finite "minus infinity": exp underflows to exactly 0, logs stay finite


def naive(student, teacher, *, divergence="forward_kl", temperature=1.0, beta=0.5, labels=None,
          hard_weight=0.0, where=None, ignore_index=None, vocab_mask=None, reduction="mean",
          axis=-1):  # fmt: skip
    """The loss as anyone would write it, differentiated by JAX's autodiff."""
    student, teacher = jnp.moveaxis(student, axis, -1), jnp.moveaxis(teacher, axis, -1)
    if vocab_mask is not None:
        student = jnp.where(vocab_mask[None, :], student, FILL)
        teacher = jnp.where(vocab_mask[None, :], teacher, FILL)
    log_p = jax.nn.log_softmax(student / temperature)
    log_q = jax.nn.log_softmax(teacher / temperature)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    if divergence == "forward_kl":
        rows = jnp.sum(q * (log_q - log_p), axis=-1)
    elif divergence == "reverse_kl":
        rows = jnp.sum(p * (log_p - log_q), axis=-1)
    else:
        m = beta * q + (1 - beta) * p
        log_m = jnp.log(jnp.where(m > 0, m, 1.0))  # m = 0 only where p = q = 0
        rows = beta * jnp.sum(q * (log_q - log_m), -1) + (1 - beta) * jnp.sum(p * (log_p - log_m), -1)  # fmt: skip
    rows = temperature**2 * rows
    kept = jnp.ones(rows.shape, bool)
    if where is not None:
        kept = kept & where
    if ignore_index is not None:
        kept = kept & (labels != ignore_index)
    if hard_weight:
        safe = jnp.where(kept, labels, 0)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(student), safe[..., None], axis=-1)
        rows = rows + hard_weight * nll[..., 0]
    rows = jnp.where(kept, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return jnp.sum(rows)
    return jnp.sum(rows) / jnp.maximum(jnp.sum(kept), 1).astype(rows.dtype)


N, V = 6, 7
LABELS = np.array([0, 3, 6, -100, 2, 5])
# Each case: options of both losses; together they use every option of distillation_loss.
CASES = {
    "forward_kl": dict(),
    "forward_kl_hard_ignore": dict(temperature=2.0, labels=LABELS, hard_weight=0.5,
                                   ignore_index=-100),
    "reverse_kl_where_sum": dict(divergence="reverse_kl", temperature=0.7,
                                 where=np.array([1, 1, 0, 1, 0, 1], bool), reduction="sum"),
    "jsd_mask_none": dict(divergence="jsd", beta=0.3, temperature=2.0, reduction="none",
                          vocab_mask=np.array([1, 1, 0, 1, 1, 1, 0], bool)),
    "jsd_hard_mask": dict(divergence="jsd", labels=np.array([0, 3, 1, 4, 2, 5]),
                          hard_weight=1.0, vocab_mask=np.array([1, 1, 1, 1, 1, 1, 0], bool)),
}  # fmt: skip


def _logits(shape=(N, V), dtype=jnp.float64, scale=3.0, seed=0):
    """NumPy arrays (jnp.asarray would compile a copying program per shape and dtype)."""
    keys = sample.split(seed, 2)
    student = sample.numpy_normal(keys[0], shape, dtype, scale=scale)
    teacher = sample.numpy_normal(keys[1], shape, dtype, scale=scale)
    return student, teacher


def test_values_and_gradients_equal_the_references():
    """Value vs float64 NumPy and the naive composition; the student's and the teacher's
    gradients (a random cotangent for ``"none"``) vs ``jax.grad`` of the naive composition.
    Every case of CASES, ours and naive, in one program; each compared on its own."""
    with jax.enable_x64(True):
        student, teacher = _logits()
        cotangents = {}
        for case, options in CASES.items():
            shape = jax.eval_shape(
                lambda s, t: distillation_loss(s, t, **options), student, teacher
            )
            cotangents[case] = sample.numpy_normal(3, shape.shape, shape.dtype)

        def every(student, teacher, cotangents):
            results = {}
            for case, options in CASES.items():
                jax_options = {k: jnp.asarray(x) if isinstance(x, np.ndarray) else x
                               for k, x in options.items()}  # fmt: skip
                results[case] = []
                for loss in (distillation_loss, naive):
                    value, vjp = jax.vjp(lambda s, t: loss(s, t, **jax_options), student, teacher)
                    results[case].append((value, vjp(cotangents[case])))
            return results

        results = jax.jit(every)(student, teacher, cotangents)
    for case, ((value, grads), (naive_value, naive_grads)) in results.items():
        expected = reference.distillation(np.asarray(student), np.asarray(teacher), **CASES[case])
        np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12, err_msg=case)
        np.testing.assert_allclose(value, naive_value, rtol=1e-12, atol=1e-12, err_msg=case)
        for got, want, name in zip(grads, naive_grads, ("student", "teacher")):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"{case} {name}")


def test_class_axis_and_batch_shape():
    """Classes on axis 0 of ``[V, 2, 3]`` logits equal the class-last loss of the moved axes."""
    with jax.enable_x64(True):
        student, teacher = _logits((V, 2, 3))
        loss = lambda s, t: distillation_loss(s, t, divergence="jsd", axis=0, temperature=1.5)
        moved = lambda x: jnp.moveaxis(x, 0, -1).reshape(6, V)
        flat = lambda s, t: naive(moved(s), moved(t), divergence="jsd", temperature=1.5)
        got, want = jax.jit(
            lambda s, t: [jax.value_and_grad(f, (0, 1))(s, t) for f in (loss, flat)]
        )(student, teacher)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_forward_kl_equals_optax():
    """``T^2`` times optax's ``kl_divergence`` (and ``convex_kl_divergence``, equal for
    normalized distributions) of ``log_softmax(z_s / T)`` against ``softmax(z_t / T)``."""
    student, teacher = _logits(dtype=jnp.float32)
    t = 2.0
    ours = lambda s: distillation_loss(s, teacher, temperature=t)
    # convex_kl_divergence is named generalized_kl_divergence since optax 0.2.6.
    generalized = getattr(optax.losses, "generalized_kl_divergence", None)
    kls = {
        "kl": optax.losses.kl_divergence,
        "convex": generalized or optax.losses.convex_kl_divergence,
    }

    def every(student):
        results = {"ours": jax.value_and_grad(ours)(student)}
        for name, kl in kls.items():
            theirs = lambda s: (
                t**2 * jnp.mean(kl(jax.nn.log_softmax(s / t), jax.nn.softmax(teacher / t)))
            )
            results[name] = jax.value_and_grad(theirs)(student)
        return results

    results = jax.jit(every)(student)
    value, grad = results["ours"]
    for name in kls:
        np.testing.assert_allclose(value, results[name][0], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(grad, results[name][1], rtol=1e-4, atol=1e-6, err_msg=name)


# jax.test_util.check_grads' step and its float64 tolerance (atol and rtol)
STEP, TOLERANCE = 1e-4, 1e-5


@functools.cache
def _differentiated():
    """For every divergence, in one program (float64, with the hard term): the loss, its
    ``jax.jvp`` along a random tangent of both logits, its ``jax.vjp`` of a random cotangent,
    the loss one step either side along the tangent, and ``jacfwd`` and ``jacrev``. The
    tangent and cotangent are check_grads' own draws (``RandomState(0)``)."""
    with jax.enable_x64(True):
        student, teacher = _logits(scale=1.5)
        labels = LABELS.clip(0)
        rng = np.random.RandomState(0)
        tangent = tuple(rng.randn(*x.shape) for x in (student, teacher))
        cotangent = rng.randn()

        def every(s, t):
            results = {}
            for divergence in divergences.DIVERGENCES:
                loss = lambda s, t, d=divergence: distillation_loss(
                    s, t, divergence=d, temperature=1.5, labels=labels, hard_weight=0.5,
                    beta=0.3 if d == "jsd" else 0.5,
                )  # fmt: skip
                value, vjp = jax.vjp(loss, s, t)
                steps = [
                    loss(s + k * STEP * tangent[0], t + k * STEP * tangent[1]) for k in (1, -1)
                ]
                results[divergence] = dict(
                    value=value, jvp=jax.jvp(loss, (s, t), tangent), vjp=vjp(cotangent),
                    steps=steps, jacfwd=jax.jacfwd(loss, (0, 1))(s, t),
                    jacrev=jax.jacrev(loss, (0, 1))(s, t),
                )  # fmt: skip
            return results

        return jax.device_get(jax.jit(every)(student, teacher)), tangent, cotangent


@pytest.mark.xdist_group("distillation_finite_differences")  # one worker compiles them all
@pytest.mark.parametrize("divergence", divergences.DIVERGENCES)
def test_finite_differences_in_forward_and_reverse_mode(divergence):
    """``jax.jvp`` and ``jax.vjp`` of the loss against finite differences (float64), for
    both logits, with the hard term, as ``jax.test_util.check_grads(order=1)`` checks them;
    and ``jacfwd`` equals ``jacrev``. (The three divergences share one program.)"""
    results, tangent, cotangent = _differentiated()
    got = results[divergence]
    plus, minus = got["steps"]
    numerical = (plus - minus) * (0.5 / STEP)  # along the tangent
    close = functools.partial(np.testing.assert_allclose, atol=TOLERANCE, rtol=TOLERANCE)
    value, jvp = got["jvp"]
    close(value, got["value"], err_msg=f"{divergence}: JVP primal")
    close(jvp, numerical, err_msg=f"{divergence}: JVP tangent")
    projected = sum(np.vdot(t, g) for t, g in zip(tangent, got["vjp"]))
    close(projected, numerical * cotangent, err_msg=f"{divergence}: VJP cotangent projection")
    for a, b, name in zip(got["jacfwd"], got["jacrev"], ("student", "teacher")):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15, err_msg=f"{divergence} {name}")


def test_gradients_run_through_the_derived_rule(monkeypatch):
    """Doubling the rule's gradients doubles ``jax.grad``'s and ``jax.jvp``'s: nothing
    differentiates the forward computation instead (the test fails if the rule is bypassed)."""
    student, teacher = _logits((3, 5), jnp.float32, seed=7)  # a shape no other test compiles
    loss = lambda s, t: distillation_loss(s, t, divergence="reverse_kl")
    rule = divergences.logits_gradients

    def doubled(*args, **kwargs):
        return tuple(None if g is None else 2 * g for g in rule(*args, **kwargs))

    monkeypatch.setattr(divergences, "logits_gradients", doubled)
    # traced here, under the patch, which the naive composition never calls
    grads, tangent, plain = jax.device_get(
        jax.jit(
            lambda s, t: (
                jax.grad(loss, (0, 1))(s, t),
                jax.jvp(loss, (s, t), (jnp.ones_like(s), t))[1],
                jax.grad(naive, (0, 1))(s, t, divergence="reverse_kl"),
            )
        )(student, teacher)
    )
    for got, want in zip(grads, plain):
        np.testing.assert_allclose(got, 2 * want, rtol=1e-5, atol=1e-7)
    plain = [np.asarray(g, np.float64) for g in plain]
    expected = np.sum(plain[0]) + np.sum(plain[1] * np.asarray(teacher))
    np.testing.assert_allclose(tangent, 2 * expected, rtol=1e-5)


@pytest.mark.parametrize("divergence", divergences.DIVERGENCES)
def test_residuals_are_the_logits_and_numbers_per_row(divergence):
    """What reverse mode keeps for the backward: the two ``[N, V]`` logits and ``[N, 1]``
    statistics, no third ``[N, V]`` array (the naive composition keeps more). The
    residuals' shapes, traced (``jax.eval_shape``): the same arrays an eager ``jax.vjp``
    keeps, without compiling a program."""
    student, teacher = _logits(dtype=jnp.float32)
    beta = 0.3 if divergence == "jsd" else 0.5
    loss = lambda s, t: distillation_loss(s, t, divergence=divergence, beta=beta)
    residuals = lambda f: jax.eval_shape(lambda s, t: jax.vjp(f, s, t)[1], student, teacher)
    large = lambda f: [x.shape for x in jax.tree.leaves(f) if math.prod(x.shape) > N]
    assert large(residuals(loss)) == [(N, V), (N, V)]
    naive_backward = residuals(lambda s, t: naive(s, t, divergence=divergence, beta=beta))
    assert len(large(naive_backward)) > 2


def _every_divergence(s, t, vocab_mask=None):
    """The three divergences' losses and their Jacobians (the gradients of each loss for
    both logits)."""

    def losses(s, t):
        return jnp.stack([distillation_loss(s, t, divergence=d, vocab_mask=vocab_mask)
                          for d in divergences.DIVERGENCES])  # fmt: skip

    return losses(s, t), jax.jacrev(losses, (0, 1))(s, t)


def test_extreme_and_infinite_logits():
    """Logits near 1e30 in float32 and ``-inf`` on classes both models leave out: the loss
    and gradients are finite and equal the float64 references (masked classes: gradient 0).
    The three inputs in one program."""
    student, teacher = (np.asarray(x) for x in _logits(dtype=jnp.float32))
    huge_s, huge_t = 1e30 * student, 1e30 * teacher + np.float32(1e29)
    mask = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    inf_s = np.where(mask[None, :], student, -np.inf).astype(np.float32)
    inf_t = np.where(mask[None, :], teacher, -np.inf).astype(np.float32)
    results = jax.device_get(
        jax.jit(
            lambda *a: {
                "huge": _every_divergence(a[0], a[1]),
                "inf": _every_divergence(a[2], a[3]),
                "masked": _every_divergence(a[4], a[5], vocab_mask=jnp.asarray(mask)),
            }
        )(huge_s, huge_t, inf_s, inf_t, student, teacher)
    )
    values, grads = results["huge"]
    for i, divergence in enumerate(divergences.DIVERGENCES):
        expected = reference.distillation(huge_s, huge_t, divergence=divergence)
        np.testing.assert_allclose(values[i], expected, rtol=1e-5, err_msg=divergence)
    assert all(np.all(np.isfinite(g)) for g in grads)
    values, grads = results["inf"]
    masked_values, masked_grads = results["masked"]
    np.testing.assert_allclose(values, masked_values, rtol=1e-6)
    for got, want in zip(grads, masked_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert np.all(np.asarray(got)[..., ~mask] == 0)


def test_bfloat16_is_computed_in_float32():
    """bf16 logits: the loss equals the float32 loss of the same values, rounded once to
    bf16, and the gradients come back in bf16 close to the float32 ones."""
    student, teacher = (x.astype(jnp.bfloat16) for x in _logits(dtype=jnp.float32))
    wide = [x.astype(np.float32) for x in (student, teacher)]
    loss = lambda s, t: distillation_loss(s, t, divergence="jsd", temperature=2.0)

    def every(student, teacher, wide):
        return dict(
            narrow=jax.value_and_grad(loss, (0, 1))(student, teacher),
            wide=jax.value_and_grad(loss, (0, 1))(*wide),
            # A bf16 teacher for a float32 student: computed in float32, the student's dtype out.
            mixed=distillation_loss(wide[0], teacher, divergence="jsd", temperature=2.0),
        )

    results = jax.device_get(jax.jit(every)(student, teacher, wide))
    (value, grads), (wide_value, wide_grads) = results["narrow"], results["wide"]
    assert value.dtype == jnp.bfloat16
    assert value == wide_value.astype(jnp.bfloat16)
    for got, want in zip(grads, wide_grads):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=1e-4)
    mixed = results["mixed"]
    assert mixed.dtype == jnp.float32 and mixed == wide_value


def test_a_frozen_teacher_gets_no_gradient_computation():
    """Differentiating the student only: the teacher's gradient is not computed (the
    program has fewer operations than the one computing both)."""
    student, teacher = _logits(dtype=jnp.float32)
    loss = lambda s, t: distillation_loss(s, t, divergence="jsd", temperature=2.0)

    def operations(argnums):
        text = jax.jit(jax.grad(loss, argnums)).lower(student, teacher).as_text()
        return text.count(" = stablehlo.")

    assert operations(0) < operations((0, 1))


BAD_CALLS = [
    (lambda s, t: distillation_loss(s, t[:, :-1]), ValueError, "same examples and vocabulary"),
    (lambda s, t: distillation_loss(s.astype(jnp.int32), t), TypeError, "student_logits"),
    (lambda s, t: distillation_loss(s, t, divergence="kl"), ValueError, "divergence"),
    (lambda s, t: distillation_loss(s, t, temperature=0.0), ValueError, "temperature"),
    (lambda s, t: distillation_loss(s, t, divergence="jsd", beta=1.0), ValueError, "reverse_kl"),
    (lambda s, t: distillation_loss(s, t, beta=0.3), ValueError, "divergence='jsd' only"),
    (lambda s, t: distillation_loss(s, t, hard_weight=1.0), ValueError, "labels is None"),
    (lambda s, t: distillation_loss(s, t, hard_weight=-1.0), ValueError, "hard_weight"),
    (lambda s, t: distillation_loss(s, t, ignore_index=-100), ValueError, "labels is None"),
    (lambda s, t: distillation_loss(s, t, labels=np.zeros((N, V), np.int32), hard_weight=1.0),
     ValueError, "labels"),
    (lambda s, t: distillation_loss(s, t, where=np.ones((N, V), bool)), ValueError, "vocab_mask"),
    (lambda s, t: distillation_loss(s, t, vocab_mask=np.ones((V + 1,), bool)), ValueError,
     "vocab_mask"),
    (lambda s, t: distillation_loss(s, t, axis=(0, 1)), TypeError, "one int"),
    (lambda s, t: distillation_loss(s, t, reduction="avg"), ValueError, "reduction"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, words", BAD_CALLS)
def test_bad_input_raises_a_clear_error(call, error, words):
    student, teacher = (np.asarray(x) for x in _logits(dtype=jnp.float32))  # NumPy: no programs
    with pytest.raises(error, match=words):
        call(student, teacher)


def test_checked_mode_raises_on_a_bad_label():
    """Unchecked, a label out of range makes its example NaN; ``checked=True`` raises, now
    for labels known in Python and through ``jaxsoftmax.checked`` under ``jit``; labels on
    a masked class count as bad; the fused loss checks the same way."""
    from jax.experimental import checkify

    from jaxsoftmax import checked, linear_distillation_loss

    student, teacher = _logits(dtype=jnp.float32)
    bad = jax.device_put(np.array([0, 3, V, 2, 2, 1], np.int32))
    options = dict(labels=bad, hard_weight=0.5, reduction="none")
    assert np.isnan(np.asarray(distillation_loss(student, teacher, **options))[2])
    with pytest.raises(ValueError, match=r"found label 7 at position \[2\]"):
        distillation_loss(student, teacher, checked=True, **options)
    mask = jax.device_put(np.arange(V) != 3)
    with pytest.raises(ValueError, match="vocab_mask keeps"):
        distillation_loss(student, teacher, labels=np.array([0, 3, 1, 2, 2, 1], np.int32), hard_weight=0.5,
                          vocab_mask=mask, checked=True)  # fmt: skip
    loss = jax.jit(functools.partial(distillation_loss, hard_weight=0.5, checked=True))
    with pytest.raises(checkify.JaxRuntimeError, match="found label 7"):
        checked(loss)(student, teacher, labels=bad)
    h, w = student, np.eye(V, dtype=np.float32)  # the fused loss of the same logits
    with pytest.raises(ValueError, match="found label 7"):
        linear_distillation_loss(h, w, teacher, w, checked=True, **options)

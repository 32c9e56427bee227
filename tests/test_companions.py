"""``return_aux=True``: the loss's companions (lse, z-loss term, correct, entropy).

Values against float64 NumPy (``reference.companions``); gradients through ``lse`` and
``entropy`` against ``jax.grad`` of the naive composition written with
``jax.nn.log_softmax``; the fused loss against the unfused one, tile by tile, for every
option; its compiled memory at Gemma 2's shape against the loss alone.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import sample

import jaxsoftmax
from jaxsoftmax import LossAux, cross_entropy, linear_cross_entropy

N, C = 9, 7
A = np.linspace(0.5, 1.5, N)  # per-row weights of lse in the tested function
B = np.linspace(-1.0, 0.7, N)  # and of the entropy


def _logits_and_extras(seed=0, n=N, c=C, dtype=jnp.float64):
    """Logits, integer labels and the cases' extras, built with NumPy (no program compiled)."""
    k = sample.split(seed, 6)
    z = sample.numpy_normal(k[0], (n, c), dtype, scale=3.0)
    labels = sample.numpy_integers(k[1], (n,), 0, c, dtype=int)  # int64 under x64
    z_np = np.asarray(z).astype(np.float64)
    labels = np.where(np.arange(n) % 2 == 0, np.argmax(z_np, -1), labels)  # some right
    labels[2] = -100  # ignored where ignore_index is set
    class_mask = sample.numpy_bernoulli(k[2], 0.7, (n, c))
    class_mask[np.arange(n), np.clip(labels, 0, None)] = True
    class_mask[4] = False  # a row without classes
    extras = {
        "rows": sample.numpy_bernoulli(k[3], 0.75, (n,)),
        "classes": class_mask,
        "weights": sample.numpy_uniform(k[4], (c,), float, low=0.5, high=2.0),
        "probabilities": sample.numpy_probabilities(k[5], (n, c), float, scale=2.0),
    }
    return z, jax.device_put(labels.astype(int)), extras


# Inputs are NumPy arrays (sample.numpy_*), passed to jitted functions as they are or through
# jax.device_put: jnp.asarray compiles a copying program for each new shape and dtype.

CASES = {
    "plain": {},
    "softcap": dict(logit_softcap=2.0),
    "z_loss_weights_smoothing": dict(z_loss=1e-2, class_weights="weights", label_smoothing=0.2),
    "row_where_ignore_index": dict(where="rows", ignore_index=-100),
    "class_where": dict(where="classes", z_loss=1e-3),
    "probabilities": dict(targets="probabilities", logit_softcap=4.0),
}


def _case(name, extras, labels):
    kw = dict(CASES[name])
    targets = extras[kw.pop("targets")] if "targets" in kw else labels
    kw = {k: extras[v] if isinstance(v, str) and v in extras else v for k, v in kw.items()}
    if "ignore_index" not in kw and jnp.issubdtype(targets.dtype, jnp.integer):
        targets = jax.device_put(np.where(np.asarray(targets) < 0, 0, targets))
    return targets, kw


def _naive_companions(z, targets, kw):
    """``(lse, entropy)`` per row by the naive composition (``jax.nn.log_softmax``), 0 on
    rows that do not count."""
    x = (
        z
        if kw.get("logit_softcap") is None
        else kw["logit_softcap"] * jnp.tanh(z / kw["logit_softcap"])
    )
    where = kw.get("where")
    class_mask = where if where is not None and where.ndim == 2 else None
    row_mask = where if where is not None and where.ndim == 1 else None
    if class_mask is not None:
        x = jnp.where(class_mask, x, -jnp.inf)
    logp = jax.nn.log_softmax(x)
    lse = jax.nn.logsumexp(x, axis=-1)
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp, 0.0), 0.0), -1)
    live = jnp.ones(z.shape[0], bool)
    if class_mask is not None:
        live = live & class_mask.any(-1)
    if row_mask is not None:
        live = live & row_mask
    if kw.get("ignore_index") is not None:
        live = live & (targets != kw["ignore_index"])
    return jnp.where(live, lse, 0.0), jnp.where(live, entropy, 0.0)


def _ours(z, targets, kw):
    return cross_entropy(z, targets, reduction="none", return_aux=True, **kw)[1]


def test_values_and_gradients_equal_the_references():
    """Every case of CASES, all in one program: values against float64 NumPy; gradients
    through ``lse`` and ``entropy`` against ``jax.grad`` of the naive composition
    (``jax.nn.log_softmax``). Each case checked on its own, named in the failure."""
    with jax.enable_x64(True):
        z, labels, extras = _logits_and_extras()
        cases = {name: _case(name, extras, labels) for name in sorted(CASES)}

        def every(z):
            results = {}
            for name, (targets, kw) in cases.items():

                def ours(z):
                    aux = cross_entropy(z, targets, reduction="none", return_aux=True, **kw)[1]
                    return jnp.sum(jnp.asarray(A) * aux.lse + jnp.asarray(B) * aux.entropy)

                def naive(z):
                    lse, entropy = _naive_companions(z, targets, kw)
                    return jnp.sum(jnp.asarray(A) * lse + jnp.asarray(B) * entropy)

                results[name] = (_ours(z, targets, kw), jax.grad(ours)(z), jax.grad(naive)(z))
            return results

        got = jax.jit(every)(z)
    for name, (targets, kw) in cases.items():
        aux, got_grad, want_grad = got[name]
        want = reference.companions(np.asarray(z), np.asarray(targets), **_numpy_kw(kw))
        assert isinstance(aux, LossAux) and aux.correct.dtype == jnp.bool_, name
        for value, expected, field in zip(aux, want, LossAux._fields):
            np.testing.assert_allclose(
                np.asarray(value, float), expected, atol=1e-12, err_msg=f"{name} {field}"
            )
        assert 0 < np.asarray(aux.correct).sum() < N, name  # the check sees both answers
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-12, err_msg=name)
        assert np.abs(np.asarray(want_grad)).max() > 0.1, name


def _numpy_kw(kw):
    kept = ("where", "ignore_index", "class_weights", "z_loss", "logit_softcap")
    return {k: np.asarray(v) if hasattr(v, "shape") else v for k, v in kw.items() if k in kept}


def test_loss_and_companion_cotangents_add_in_one_rule():
    """The loss, a z-loss built by the user on ``lse`` and an entropy bonus, together."""
    with jax.enable_x64(True):
        z, labels, _ = _logits_and_extras(seed=2)
        labels = jax.device_put(np.clip(labels, 0, None))

        def ours(z):
            loss, aux = cross_entropy(z, labels, return_aux=True)
            return loss + 1e-2 * jnp.mean(aux.lse**2) - 0.1 * jnp.mean(aux.entropy)

        def naive(z):
            logp = jax.nn.log_softmax(z)
            nll = -jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
            entropy = -jnp.sum(jnp.exp(logp) * logp, -1)
            lse = jax.nn.logsumexp(z, -1)
            return jnp.mean(nll) + 1e-2 * jnp.mean(lse**2) - 0.1 * jnp.mean(entropy)

        both = jax.jit(lambda z: [jax.value_and_grad(f)(z) for f in (ours, naive)])
        (value, grad), (want_value, want_grad) = both(z)
        np.testing.assert_allclose(grad, want_grad, atol=1e-13)
        np.testing.assert_allclose(value, want_value, rtol=1e-13)


def test_stable_at_extreme_logits():
    z = jax.device_put(np.array([[1e30, 0.0, -1e30], [3e4, 3e4, -np.inf]], np.float32))
    labels = jax.device_put(np.array([0, 1], np.int32))

    def aux_and_grads(z):
        aux = cross_entropy(z, labels, reduction="none", return_aux=True)[1]
        entropy = lambda z: jnp.sum(cross_entropy(z, labels, return_aux=True)[1].entropy)
        return aux, jax.grad(entropy)(z)

    aux, grads = jax.jit(aux_and_grads)(z)
    np.testing.assert_allclose(aux.lse, [1e30, 3e4 + math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(aux.entropy, [0.0, math.log(2)], atol=1e-6)
    assert aux.correct.tolist() == [True, False]  # a tie goes to the first class
    assert np.isfinite(np.asarray(grads)).all()


def test_bf16_companions_are_float32():
    z, labels, _ = _logits_and_extras(dtype=jnp.bfloat16)
    labels = np.clip(labels, 0, None)
    loss, aux = jax.jit(lambda z, y: cross_entropy(z, y, return_aux=True))(
        z, jax.device_put(labels)
    )
    assert loss.dtype == jnp.bfloat16
    assert aux.lse.dtype == aux.entropy.dtype == aux.z_loss.dtype == jnp.float32
    want = reference.companions(np.asarray(z).astype(np.float32), labels)
    np.testing.assert_allclose(aux.lse, want[0], rtol=1e-6)


# ----------------------------------------------------------------- the fused loss

FUSED_OPTIONS = {
    "plain": {},
    "everything": dict(
        class_weights="weights",
        label_smoothing=0.1,
        z_loss=1e-3,
        logit_softcap=3.0,
        ignore_index=-100,
        where="rows",
    ),  # fmt: skip
    "sum": dict(reduction="sum", z_loss=1e-2),
}


def _fused_inputs(seed=3, n=37, d=6, v=23):
    k = sample.split(seed, 6)
    hidden = sample.numpy_normal(k[0], (n, d))
    classifier = sample.numpy_normal(k[1], (v, d), scale=3 / math.sqrt(d))
    bias = sample.numpy_normal(k[2], (v,))
    labels = sample.numpy_integers(k[3], (n,), 0, v)
    labels[5] = -100
    extras = {
        "weights": sample.numpy_uniform(k[4], (v,), low=0.5, high=2.0),
        "rows": sample.numpy_bernoulli(k[5], 0.8, (n,)),
    }
    return hidden, classifier, bias, jax.device_put(labels), extras


def _total(loss, aux):
    """A scalar through every differentiable output: loss, lse, entropy and the z-loss."""
    rows = jnp.linspace(0.5, 1.5, aux.lse.size).reshape(aux.lse.shape)
    return (
        jnp.sum(loss)
        + jnp.sum(rows * aux.lse)
        - jnp.sum(rows[::-1] * aux.entropy)
        + jnp.sum(aux.z_loss)
    )


FUSED_CASES = {
    "recompute": [(name, layout) for name in sorted(FUSED_OPTIONS) for layout in ("vd", "dv")],
    "forward": [("everything", "vd"), ("sum", "vd"), ("plain", "dv")],
}


@pytest.mark.parametrize("method", sorted(FUSED_CASES))
def test_fused_companions_equal_the_unfused_loss(method):
    """Ragged token and vocabulary chunks (37 rows by 8, 23 classes by 5), both methods: the
    forward method finds the companions on whole rows and their cotangents by one more
    pass in the backward. Every case of the method, fused and unfused, in one program;
    each compared on its own."""
    hidden, classifier, bias, labels, extras = _fused_inputs()

    def case(name, layout, h, w, b):
        kw = {
            k: extras.get(v, v) if isinstance(v, str) else v for k, v in FUSED_OPTIONS[name].items()
        }
        y = labels if "ignore_index" in kw else jnp.asarray(np.clip(labels, 0, None))
        w = w if layout == "vd" else w.T

        def fused(h, w, b):
            out = linear_cross_entropy(
                h, w, y, bias=b, token_chunk=8, vocab_chunk=5, classifier_layout=layout,
                return_aux=True, method=method, **kw,
            )  # fmt: skip
            return _total(*out), out[1]

        def unfused(h, w, b):
            logits = h @ (w.T if layout == "vd" else w) + b[None, :]
            out = cross_entropy(logits, y, return_aux=True, **kw)
            return _total(*out), out[1]

        return [jax.value_and_grad(f, (0, 1, 2), has_aux=True)(h, w, b) for f in (fused, unfused)]

    every = lambda h, w, b: {c: case(*c, h, w, b) for c in FUSED_CASES[method]}
    for (name, layout), (got, want) in jax.jit(every)(hidden, classifier, bias).items():
        ((value, aux), grads), ((want_value, want_aux), want_grads) = got, want
        np.testing.assert_allclose(value, want_value, rtol=2e-5, err_msg=f"{name} {layout}")
        for g, expected, field in zip(aux, want_aux, LossAux._fields):
            np.testing.assert_allclose(
                np.asarray(g, np.float32), np.asarray(expected, np.float32), rtol=2e-5,
                atol=2e-5, err_msg=f"{name} {layout} {field}",
            )  # fmt: skip
        for g, expected, what in zip(grads, want_grads, ("hidden", "classifier", "bias")):
            np.testing.assert_allclose(
                g, expected, rtol=2e-4, atol=2e-5, err_msg=f"{name} {layout} d_{what}"
            )


def test_fused_companions_have_the_batch_shape():
    hidden, classifier, _, labels, _ = _fused_inputs()
    loss, aux = linear_cross_entropy(
        np.asarray(hidden).reshape(37, 1, 6),
        classifier,
        jax.device_put(np.clip(labels, 0, None).reshape(37, 1)),
        return_aux=True,
    )
    assert loss.shape == () and all(a.shape == (37, 1) for a in aux)


def test_forward_method_skips_the_companions_pass_when_only_logging():
    """The loss's gradient alone (the companions logged, not differentiated) equals the
    loss without them, and the extra pass sits behind a conditional on the cotangents."""
    hidden, classifier, _, labels, _ = _fused_inputs()
    labels = jax.device_put(np.clip(labels, 0, None))
    loss = lambda h, aux: linear_cross_entropy(
        h, classifier, labels, method="forward", return_aux=aux
    )
    logged, alone = jax.jit(
        lambda h: (jax.grad(lambda h: loss(h, True)[0])(h), jax.grad(lambda h: loss(h, False))(h))
    )(hidden)
    np.testing.assert_allclose(logged, alone, rtol=1e-6)
    program = str(jax.make_jaxpr(jax.grad(lambda h: loss(h, True)[0]))(hidden))
    assert program.count(" cond[") > str(
        jax.make_jaxpr(jax.grad(lambda h: loss(h, False)))(hidden)
    ).count(" cond[")


def test_bad_return_aux_values_are_refused():
    hidden, classifier, _, labels, _ = _fused_inputs()
    with pytest.raises(TypeError, match="return_aux must be True or False; got str"):
        linear_cross_entropy(hidden, classifier, labels, return_aux="yes")
    with pytest.raises(TypeError, match="return_aux must be True or False; got int"):
        cross_entropy(hidden, jax.device_put(np.clip(labels, 0, 5)), return_aux=1)


def test_fused_companions_hold_no_more_memory_at_gemma_shape():
    """Within 10% of the loss alone (compiled, loss and both gradients; float32)."""
    n, d, v = 8192, 2304, 256000
    s = jax.ShapeDtypeStruct
    args = (s((n, d), jnp.float32), s((v, d), jnp.float32), s((n,), jnp.int32))

    def temp(loss):
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    alone = temp(lambda h, w, y: linear_cross_entropy(h, w, y))
    with_aux = temp(lambda h, w, y: _total(*linear_cross_entropy(h, w, y, return_aux=True)))
    assert with_aux <= 1.1 * alone, (with_aux, alone)


def test_public_api_lists_loss_aux():
    assert "LossAux" in jaxsoftmax.__all__ and jaxsoftmax.LossAux is LossAux

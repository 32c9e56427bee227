"""``vocab_mask``: classes that do not exist (a padded vocabulary), shared by every row.

References: the loss of the logits with ``-inf`` on the masked classes (what the mask
means, without label smoothing); float64 NumPy with the mask as every row's class mask
(with smoothing, whose mass goes to the existing classes only); the fused loss against the
unfused one for both methods.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import sample

import jaxsoftmax
from jaxsoftmax import cross_entropy, linear_cross_entropy

N, C = 11, 13
MASK = np.array([c % 4 != 1 and c < 11 for c in range(C)])  # holes and a padded end


# Inputs are NumPy arrays (sample.numpy_*), passed to jitted functions as they are or through
# jax.device_put: jnp.asarray compiles a copying program for each new shape and dtype.


def _inputs(seed=0, n=N, c=C):
    k = sample.split(seed, 4)
    z = sample.numpy_normal(k[0], (n, c), scale=3.0)
    labels = sample.numpy_integers(k[1], (n,), 0, c)
    labels = jax.device_put(np.where(MASK[labels], labels, 0))  # labels on existing classes
    probabilities = sample.numpy_probabilities(k[2], (n, c))
    weights = sample.numpy_uniform(k[3], (c,), low=0.5, high=2.0)
    return z, labels, probabilities, weights


OPTIONS = {
    "plain": {},
    "weights_z_loss": dict(class_weights="weights", z_loss=1e-2),
    "ignore_index_where": dict(ignore_index=0, where="rows"),
}


def _resolve(options, weights):
    rows = np.arange(N) % 3 != 2
    return {
        k: weights if v == "weights" else rows if v == "rows" else v for k, v in options.items()
    }


def test_equals_minus_infinity_on_the_masked_logits():
    """Every option set of OPTIONS with labels and with probabilities, in one program; each
    case compared on its own."""
    z, labels, probabilities, weights = _inputs()
    y = np.where(MASK, np.asarray(probabilities), 0.0)
    targets = {"labels": labels, "probabilities": jax.device_put(y / y.sum(-1, keepdims=True))}
    cases = [(name, kind) for name in sorted(OPTIONS) for kind in targets]

    def case(z, name, kind):
        kw = _resolve(OPTIONS[name], weights)
        if kind == "probabilities":
            kw.pop("ignore_index", None)
        y = targets[kind]
        masked = lambda z: cross_entropy(z, y, vocab_mask=MASK, reduction="sum", **kw)
        minus_inf = lambda z: cross_entropy(jnp.where(MASK, z, -jnp.inf), y, reduction="sum", **kw)
        return jax.value_and_grad(masked)(z), jax.value_and_grad(minus_inf)(z)

    got = jax.jit(lambda z: {c: case(z, *c) for c in cases})(z)
    for c, ((value, grad), (want, want_grad)) in got.items():
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=str(c))
        np.testing.assert_allclose(grad, want_grad, atol=1e-6, err_msg=str(c))
        grad = np.asarray(grad)
        assert np.all(grad[:, ~MASK] == 0) and np.abs(grad).max() > 0.01, c


def test_smoothing_goes_to_existing_classes_only():
    """Against NumPy with the mask as every row's class mask; with a soft cap too (masked
    after the cap: ``cap tanh(-inf / cap)`` would be ``-cap``, a class that exists)."""
    z, labels, _, weights = _inputs(seed=1)
    kw = dict(label_smoothing=0.2, class_weights=weights, reduction="none", logit_softcap=4.0)
    got, minus_inf = jax.jit(
        lambda z: (
            cross_entropy(z, labels, vocab_mask=MASK, **kw),
            cross_entropy(jnp.where(MASK, z, -jnp.inf), labels, label_smoothing=0.2),
        )
    )(z)
    every_row = np.broadcast_to(MASK, z.shape)
    want = reference.cross_entropy(np.asarray(z), np.asarray(labels), where=every_row, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # minus infinity would put smoothing mass on impossible classes: an infinite loss
    assert np.isinf(minus_inf)


def test_a_label_on_a_masked_class_is_a_bad_label():
    z, labels, _, _ = _inputs(seed=2)
    labels = np.array(labels)
    labels[3] = 1  # class 1 is masked
    without = labels.copy()
    without[3] = -100
    labels, without = jax.device_put(labels), jax.device_put(without)
    per_row = jax.vmap(jax.value_and_grad(lambda z, y: cross_entropy(z, y, vocab_mask=MASK)))
    (losses, grads), ignored = jax.device_get(
        jax.jit(
            lambda z: (
                per_row(z, labels),
                cross_entropy(z, without, vocab_mask=MASK, ignore_index=-100),
            )
        )(z)
    )
    assert np.isnan(losses[3]) and np.isnan(grads[3]).all()
    assert np.isfinite(np.delete(np.asarray(losses), 3)).all()
    # ignored, it is no example at all
    assert np.isfinite(ignored)
    with pytest.raises(ValueError, match=r"found label 1 at position \[3\].*vocab_mask keeps"):
        cross_entropy(z, labels, vocab_mask=MASK, checked=True)
    checked = jaxsoftmax.checked(
        jax.jit(lambda z, y: cross_entropy(z, y, vocab_mask=MASK, checked=True))
    )
    with pytest.raises(Exception, match=r"found label 1 at position \[3\]"):
        checked(z, labels)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.ones(C - 1, bool), r"shape \(13,\); got bool array of shape \(12,\)"),
        (np.ones(C, np.int32), r"got int32"),
    ],
)
def test_bad_masks_are_refused_before_any_computation(mask, message):
    z, labels, _, _ = _inputs()
    for loss in (
        lambda: cross_entropy(z, labels, vocab_mask=mask),
        lambda: linear_cross_entropy(
            z, jax.device_put(np.eye(C, dtype=np.float32)), labels, vocab_mask=mask
        ),
    ):
        with pytest.raises(ValueError, match="vocab_mask must be a boolean array .*" + message):
            loss()


# ----------------------------------------------------------------- the fused loss


def test_fused_equals_the_unfused_loss_and_padding_rows_get_no_gradient():
    """Ragged chunks (37 tokens by 8, 23 classes by 5) over a vocabulary padded from 18 to
    23 classes with holes: the classifier's and bias's masked rows get exactly 0. Both
    methods and the unfused loss in one program."""
    n, d, v = 37, 6, 23
    mask = (np.arange(v) % 4 != 1) & (np.arange(v) < 18)
    hidden = sample.numpy_normal(3, (n, d))
    classifier = sample.numpy_normal(4, (v, d), scale=3 / math.sqrt(d))
    bias = sample.numpy_normal(5, (v,))
    labels = sample.numpy_integers(6, (n,), 0, v)
    labels = jax.device_put(np.where(mask[labels], labels, 0))
    weights = jax.device_put(np.linspace(0.5, 2.0, v, dtype=np.float32))
    kw = dict(label_smoothing=0.1, class_weights=weights, z_loss=1e-3)
    mask = jax.device_put(mask)

    def fused(h, w, b, method):
        return linear_cross_entropy(
            h, w, labels, bias=b, vocab_mask=mask, token_chunk=8, vocab_chunk=5, method=method,
            **kw,
        )  # fmt: skip

    def unfused(h, w, b):
        return cross_entropy(h @ w.T + b[None, :], labels, vocab_mask=mask, **kw)

    def every(h, w, b):
        results = {
            method: jax.value_and_grad(lambda h, w, b: fused(h, w, b, method), (0, 1, 2))(h, w, b)
            for method in METHODS
        }
        results["unfused"] = jax.value_and_grad(unfused, (0, 1, 2))(h, w, b)
        return results

    results = jax.jit(every)(hidden, classifier, bias)
    want = results["unfused"]
    for method in METHODS:
        got = results[method]
        for g, w, what in zip(
            jax.tree.leaves(got), jax.tree.leaves(want), ("loss", "hidden", "classifier", "bias")
        ):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=f"{method} {what}")
        d_classifier, d_bias = got[1][1], got[1][2]
        assert np.all(np.asarray(d_classifier)[~np.asarray(mask)] == 0), method
        assert np.all(np.asarray(d_bias)[~np.asarray(mask)] == 0), method


METHODS = ["recompute", "forward"]


def test_fused_companions_and_bad_labels_with_a_mask():
    n, d, v = 16, 4, 20
    mask = np.arange(v) < 15
    hidden, classifier = sample.numpy_normal(4, (n, d)), sample.numpy_normal(5, (v, d))
    classifier[17] = np.asarray(hidden)[0] * 10  # the largest logit, on a masked class
    classifier = jax.device_put(classifier)
    labels = sample.numpy_integers(6, (n,), 0, 15)
    labels[5] = 16

    def both(hidden, classifier):
        fused = linear_cross_entropy(
            hidden, classifier, jnp.asarray(labels), vocab_mask=jnp.asarray(mask), return_aux=True,
            reduction="none", vocab_chunk=4,
        )  # fmt: skip
        _, want = cross_entropy(
            hidden @ classifier.T,
            jnp.asarray(labels),
            vocab_mask=jnp.asarray(mask),
            return_aux=True,
            reduction="none",
        )
        return fused, want

    (loss, aux), want = jax.device_get(jax.jit(both)(hidden, classifier))
    assert np.isnan(loss[5]) and np.isfinite(np.delete(np.asarray(loss), 5)).all()
    np.testing.assert_array_equal(aux.correct, want.correct)
    np.testing.assert_allclose(aux.lse, want.lse, rtol=1e-6)
    np.testing.assert_allclose(aux.entropy, want.entropy, rtol=1e-5, atol=1e-6)
    logits = np.asarray(hidden) @ np.asarray(classifier).T
    assert aux.correct[0] == (np.argmax(np.where(mask, logits[0], -np.inf)) == labels[0])


def test_fused_loss_skips_tiles_of_masked_classes():
    """With a mask, each tile's work sits in a conditional on it holding a class (forward
    and backward), beside the conditionals that choose each backend's program."""
    hidden, classifier = (
        jax.device_put(np.ones((8, 4), np.float32)),
        jax.device_put(np.ones((20, 4), np.float32)),
    )
    labels, mask = jax.device_put(np.zeros(8, np.int32)), jax.device_put(np.arange(20) < 12)

    def conditionals(**kw):
        fn = jax.value_and_grad(
            lambda h, w: linear_cross_entropy(
                h, w, labels, vocab_chunk=4, method="recompute", **kw
            ),
            (0, 1),
        )
        return str(jax.make_jaxpr(fn)(hidden, classifier)).count(" cond[")

    assert conditionals(vocab_mask=mask) >= conditionals() + 2

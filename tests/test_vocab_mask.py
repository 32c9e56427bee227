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


def _inputs(seed=0, n=N, c=C):
    k = sample.split(seed, 4)
    z = sample.normal(k[0], (n, c), scale=3.0)
    labels = sample.integers(k[1], (n,), 0, c)
    labels = jnp.where(jnp.asarray(MASK)[labels], labels, 0)  # labels on existing classes
    probabilities = sample.probabilities(k[2], (n, c))
    weights = sample.uniform(k[3], (c,), low=0.5, high=2.0)
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


@pytest.mark.parametrize("targets", ["labels", "probabilities"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_equals_minus_infinity_on_the_masked_logits(name, targets):
    z, labels, probabilities, weights = _inputs()
    kw = _resolve(OPTIONS[name], weights)
    if targets == "probabilities":
        kw.pop("ignore_index", None)
        y = jnp.where(MASK, probabilities, 0.0)
        y = y / jnp.sum(y, -1, keepdims=True)
    else:
        y = labels
    masked = lambda z: cross_entropy(z, y, vocab_mask=MASK, reduction="sum", **kw)
    minus_inf = lambda z: cross_entropy(jnp.where(MASK, z, -jnp.inf), y, reduction="sum", **kw)
    value, grad = jax.value_and_grad(masked)(z)
    want, want_grad = jax.value_and_grad(minus_inf)(z)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    assert np.all(np.asarray(grad)[:, ~MASK] == 0) and np.abs(grad).max() > 0.01


def test_smoothing_goes_to_existing_classes_only():
    """Against NumPy with the mask as every row's class mask; with a soft cap too (masked
    after the cap: ``cap tanh(-inf / cap)`` would be ``-cap``, a class that exists)."""
    z, labels, _, weights = _inputs(seed=1)
    kw = dict(label_smoothing=0.2, class_weights=weights, reduction="none", logit_softcap=4.0)
    got = cross_entropy(z, labels, vocab_mask=MASK, **kw)
    every_row = np.broadcast_to(MASK, z.shape)
    want = reference.cross_entropy(np.asarray(z), np.asarray(labels), where=every_row, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # minus infinity would put smoothing mass on impossible classes: an infinite loss
    assert np.isinf(cross_entropy(jnp.where(MASK, z, -jnp.inf), labels, label_smoothing=0.2))


def test_a_label_on_a_masked_class_is_a_bad_label():
    z, labels, _, _ = _inputs(seed=2)
    labels = labels.at[3].set(1)  # class 1 is masked
    losses, grads = jax.vmap(jax.value_and_grad(lambda z, y: cross_entropy(z, y, vocab_mask=MASK)))(
        z, labels
    )
    assert np.isnan(losses[3]) and np.isnan(grads[3]).all()
    assert np.isfinite(np.delete(np.asarray(losses), 3)).all()
    # ignored, it is no example at all
    ignored = cross_entropy(z, labels.at[3].set(-100), vocab_mask=MASK, ignore_index=-100)
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
        lambda: linear_cross_entropy(z, jnp.eye(C), labels, vocab_mask=mask),
    ):
        with pytest.raises(ValueError, match="vocab_mask must be a boolean array .*" + message):
            loss()


# ----------------------------------------------------------------- the fused loss


@pytest.mark.parametrize("method", ["recompute", "forward"])
def test_fused_equals_the_unfused_loss_and_padding_rows_get_no_gradient(method):
    """Ragged chunks (37 tokens by 8, 23 classes by 5) over a vocabulary padded from 18 to
    23 classes with holes: the classifier's and bias's masked rows get exactly 0."""
    n, d, v = 37, 6, 23
    mask = (jnp.arange(v) % 4 != 1) & (jnp.arange(v) < 18)
    hidden = sample.normal(3, (n, d))
    classifier = sample.normal(4, (v, d), scale=3 / math.sqrt(d))
    bias = sample.normal(5, (v,))
    labels = sample.integers(6, (n,), 0, v)
    labels = jnp.where(mask[labels], labels, 0)
    kw = dict(label_smoothing=0.1, class_weights=jnp.linspace(0.5, 2.0, v), z_loss=1e-3)

    def fused(h, w, b):
        return linear_cross_entropy(
            h, w, labels, bias=b, vocab_mask=mask, token_chunk=8, vocab_chunk=5, method=method,
            **kw,
        )  # fmt: skip

    def unfused(h, w, b):
        return cross_entropy(h @ w.T + b[None, :], labels, vocab_mask=mask, **kw)

    got = jax.value_and_grad(fused, (0, 1, 2))(hidden, classifier, bias)
    want = jax.value_and_grad(unfused, (0, 1, 2))(hidden, classifier, bias)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
    d_classifier, d_bias = got[1][1], got[1][2]
    assert np.all(np.asarray(d_classifier)[~np.asarray(mask)] == 0)
    assert np.all(np.asarray(d_bias)[~np.asarray(mask)] == 0)


def test_fused_companions_and_bad_labels_with_a_mask():
    n, d, v = 16, 4, 20
    mask = jnp.arange(v) < 15
    hidden, classifier = sample.normal(4, (n, d)), sample.normal(5, (v, d))
    classifier = classifier.at[17].set(hidden[0] * 10)  # the largest logit, on a masked class
    labels = sample.integers(6, (n,), 0, 15).at[5].set(16)
    loss, aux = linear_cross_entropy(
        hidden, classifier, labels, vocab_mask=mask, return_aux=True, reduction="none",
        vocab_chunk=4,
    )  # fmt: skip
    _, want = cross_entropy(
        hidden @ classifier.T, labels, vocab_mask=mask, return_aux=True, reduction="none"
    )
    assert np.isnan(loss[5]) and np.isfinite(np.delete(np.asarray(loss), 5)).all()
    np.testing.assert_array_equal(aux.correct, want.correct)
    np.testing.assert_allclose(aux.lse, want.lse, rtol=1e-6)
    np.testing.assert_allclose(aux.entropy, want.entropy, rtol=1e-5, atol=1e-6)
    logits = np.asarray(hidden @ classifier.T)
    assert aux.correct[0] == (np.argmax(np.where(mask, logits[0], -np.inf)) == labels[0])


def test_fused_loss_skips_tiles_of_masked_classes():
    """With a mask, each tile's work sits in a conditional on it holding a class (forward
    and backward), beside the conditionals that choose each backend's program."""
    hidden, classifier = jnp.ones((8, 4)), jnp.ones((20, 4))
    labels, mask = jnp.zeros(8, jnp.int32), jnp.arange(20) < 12

    def conditionals(**kw):
        fn = jax.value_and_grad(
            lambda h, w: linear_cross_entropy(
                h, w, labels, vocab_chunk=4, method="recompute", **kw
            ),
            (0, 1),
        )
        return str(jax.make_jaxpr(fn)(hidden, classifier)).count(" cond[")

    assert conditionals(vocab_mask=mask) >= conditionals() + 2

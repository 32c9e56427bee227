"""``linear_cross_entropy(..., gradient_filter=eps)``: the backward skips negligible tiles.

The reference is the naive gradient ``G = softmax(z) - onehot(y)`` (times ``1/N``) with every
``[token_chunk, vocab_chunk]`` tile whose entries are all at most ``eps / N`` set to zero,
then contracted: ``dh = G W``, ``dW = G^T h``. The filtered fused gradient must equal it,
and differ from the exact one (tiles were skipped), by no more than the dropped entries.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sample

from jaxsoftmax import linear_cross_entropy

N, D, V, T, VC = 48, 8, 96, 16, 24  # 3 x 4 tiles
# The tests share the one program of _fused_gradients: one worker.
pytestmark = pytest.mark.xdist_group("gradient_filter")


def _peaked_inputs():
    """Logits whose softmax is concentrated, as a trained model's are: the tokens of token
    chunk ``a`` point at the classes of vocabulary chunk ``a``, so most other tiles hold
    nothing but tiny probabilities. (Built with NumPy: no program compiled.)"""
    topic = np.arange(N) // T  # 0, 1, 2: the vocabulary chunk each token chunk points at
    hidden = 4.0 * np.eye(D, dtype=np.float32)[topic] + np.asarray(
        sample.normal(0, (N, D), scale=0.3)
    )
    classifier = 3.0 * np.eye(D, dtype=np.float32)[np.arange(V) // VC]
    classifier = classifier + np.asarray(sample.normal(1, (V, D), scale=0.3))
    labels = topic * VC + np.asarray(sample.integers(2, (N,), 0, VC))
    return jnp.asarray(hidden), jnp.asarray(classifier), jnp.asarray(labels.astype(np.int32))


def _filtered_reference(hidden, classifier, labels, eps):
    z = np.asarray(hidden, np.float64) @ np.asarray(classifier, np.float64).T
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    grad = (p - np.eye(V)[np.asarray(labels)]) / N
    kept = np.ones_like(grad)
    for t in range(0, N, T):
        for c in range(0, V, VC):
            if np.all(np.abs(grad[t : t + T, c : c + VC]) <= eps / N):
                kept[t : t + T, c : c + VC] = 0
    grad = grad * kept
    return grad @ np.asarray(classifier, np.float64), grad.T @ np.asarray(hidden, np.float64), kept


EPSILONS = (1e-4, 1e-2, 1e-30, None)


@functools.cache
def _fused_gradients():
    """The fused gradients for every ``gradient_filter`` of EPSILONS, in one program."""
    hidden, classifier, labels = _peaked_inputs()

    def every(h, w):
        return {
            str(eps): jax.grad(
                lambda h, w: linear_cross_entropy(
                    h, w, labels, token_chunk=T, vocab_chunk=VC, gradient_filter=eps
                ),
                (0, 1),
            )(h, w)
            for eps in EPSILONS
        }

    return jax.device_get(jax.jit(every)(hidden, classifier))


@pytest.mark.parametrize("eps", [1e-4, 1e-2])
def test_filtered_gradient_equals_the_tile_masked_naive_gradient(eps):
    hidden, classifier, labels = _peaked_inputs()
    d_hidden, d_classifier = _fused_gradients()[str(eps)]
    want_hidden, want_classifier, kept = _filtered_reference(hidden, classifier, labels, eps)
    assert 0 < kept.mean() < 1, "some tiles skipped, some not: the check can fail"
    np.testing.assert_allclose(d_hidden, want_hidden, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d_classifier, want_classifier, rtol=1e-4, atol=1e-6)
    exact = _fused_gradients()[str(None)]
    assert not np.allclose(d_classifier, exact[1], rtol=1e-6, atol=1e-9)


def test_exact_by_default_and_at_a_tiny_eps():
    hidden, classifier, labels = _peaked_inputs()
    exact = _fused_gradients()[str(None)]
    want_hidden, want_classifier, kept = _filtered_reference(hidden, classifier, labels, 0.0)
    assert kept.all()
    np.testing.assert_allclose(exact[0], want_hidden, rtol=1e-4, atol=1e-6)
    tiny = _fused_gradients()[str(1e-30)]
    for a, b in zip(tiny, exact):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_values_and_the_forward_method_are_refused():
    hidden, classifier, labels = _peaked_inputs()
    for bad in (0.0, -1e-3, "high", True):
        with pytest.raises(ValueError, match='gradient_filter must be None, a float > 0 or "auto"'):
            linear_cross_entropy(hidden, classifier, labels, gradient_filter=bad)
    with pytest.raises(ValueError, match='method="forward" cannot filter the gradient'):
        linear_cross_entropy(hidden, classifier, labels, gradient_filter=1e-3, method="forward")
    # "auto" is the dtype's resolution over 32, as in Cut Cross-Entropy: 2**-12 for bf16
    bf16 = [jnp.asarray(np.asarray(x).astype(jnp.bfloat16)) for x in (hidden, classifier)]
    auto = jax.jit(
        jax.grad(
            lambda h: linear_cross_entropy(h, bf16[1], labels, gradient_filter="auto").astype(
                jnp.float32
            )
        )
    )(bf16[0])
    assert np.isfinite(np.asarray(auto, np.float32)).all()

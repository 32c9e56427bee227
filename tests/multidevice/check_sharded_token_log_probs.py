"""The token log-probabilities with a vocabulary-split classifier, on 8 virtual CPU devices.

Run by ``tests/test_eight_devices.py`` in the same child pytest as the other multi-device
checks. ``sharded_linear_token_log_probs`` on a 2 x 4 mesh (tokens over 2, vocabulary over 4)
against the float64 NumPy definitions (``log p_y = log_softmax(z / T)_y``, ``H``) and their
derived gradients (``dz = (g (onehot - p) - g_H p (log p + H)) / T``, taken through
``z = h W^T + b`` in NumPy), with a vocabulary that does not divide by 4 (padded), a mask,
a temperature, both layouts and batch-invariant mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxsoftmax import sharded_linear_token_log_probs

N, D, V = 12, 8, 37  # 37 classes over 4 shards: padded to 40


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() != 8:
        pytest.fail(f"these checks need 8 devices; got {jax.device_count()}.")


def numpy_expected(h, w, b, y, where, temperature, g, g_h):
    """``(log p, H, dh, dW [V, d], db)`` in float64 from the definitions."""
    h, w, b = (np.float64(a) for a in (h, w, b))
    x = (h @ w.T + b) / temperature
    x = x - x.max(-1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
    p = np.exp(log_p)
    entropy = -(p * log_p).sum(-1)
    picked = log_p[np.arange(len(y)), y]
    onehot = np.eye(w.shape[0])[y]
    dz = (g[:, None] * (onehot - p) - g_h[:, None] * p * (log_p + entropy[:, None])) / temperature
    dz = np.where(where[:, None], dz, 0.0)
    picked, entropy = np.where(where, picked, 0.0), np.where(where, entropy, 0.0)
    return picked, entropy, dz @ w, dz.T @ h, dz.sum(0)


@functools.cache
def sample():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(V, D)) / 2).astype(np.float32)
    b = rng.normal(size=(V,)).astype(np.float32)
    y = rng.integers(0, V, N).astype(np.int32)
    where = rng.random(N) > 0.2
    g, g_h = rng.normal(size=N), rng.normal(size=N)
    return h, w, b, y, where, g, g_h


@pytest.mark.parametrize(
    "layout, temperature, batch_invariant", [("vd", 1.0, False), ("dv", 0.7, True)]
)
def test_sharded_token_log_probs_equal_the_definitions(layout, temperature, batch_invariant):
    h, w, b, y, where, g, g_h = sample()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "vocab"))
    classifier = w if layout == "vd" else w.T

    def scored(h, c, b):
        return sharded_linear_token_log_probs(
            h, c, y, mesh=mesh, class_axis_name="vocab", batch_axis_name="batch", bias=b,
            where=where, temperature=temperature, classifier_layout=layout,
            return_entropy=True, token_chunk=4, vocab_chunk=3, batch_invariant=batch_invariant,
        )  # fmt: skip

    def total(h, c, b):
        log_p, entropy = scored(h, c, b)
        return jnp.sum(g * log_p + g_h * entropy), (log_p, entropy)

    grads, (log_p, entropy) = jax.jit(jax.grad(total, argnums=(0, 1, 2), has_aux=True))(
        h, classifier, b
    )
    want = numpy_expected(h, w, b, y, where, temperature, g, g_h)
    d_classifier = np.asarray(grads[1]) if layout == "vd" else np.asarray(grads[1]).T
    got = (log_p, entropy, grads[0], d_classifier, grads[2])
    names = ("log p", "entropy", "d hidden", "d classifier", "d bias")
    for name, a, e in zip(names, got, want):
        np.testing.assert_allclose(np.asarray(a), e, rtol=2e-5, atol=2e-5, err_msg=name)
    assert log_p.dtype == jnp.float32 and grads[1].shape == classifier.shape


def numpy_tangents(h, w, b, y, where, temperature, tangents):
    """``(d log p_y, dH)`` in float64 from the definitions: ``dx = (dh W^T + h dW^T + db) / T``,
    ``d log p_y = dx_y - sum_c p_c dx_c``, ``dH = -sum_c p_c (log p_c + H) dx_c``."""
    h, w, b = (np.float64(a) for a in (h, w, b))
    dh, dw, db = (np.float64(a) for a in tangents)
    x = (h @ w.T + b) / temperature
    dx = (dh @ w.T + h @ dw.T + db) / temperature
    x = x - x.max(-1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
    p = np.exp(log_p)
    entropy = -(p * log_p).sum(-1)
    d_log_p = dx[np.arange(len(y)), y] - (p * dx).sum(-1)
    d_entropy = -(p * (log_p + entropy[:, None]) * dx).sum(-1)
    return np.where(where, d_log_p, 0.0), np.where(where, d_entropy, 0.0)


def test_sharded_forward_mode_tangents_equal_the_definitions():
    """``forward_mode=True`` on the 2 x 4 mesh: ``jax.jvp`` with every input moving."""
    h, w, b, y, where, _, _ = sample()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "vocab"))
    rng = np.random.default_rng(1)
    tangents = tuple(rng.normal(size=a.shape).astype(np.float32) for a in (h, w, b))

    def scored(h, w, b):
        return sharded_linear_token_log_probs(
            h, w, y, mesh=mesh, class_axis_name="vocab", batch_axis_name="batch", bias=b,
            where=where, temperature=0.7, return_entropy=True, token_chunk=4, vocab_chunk=3,
            forward_mode=True,
        )  # fmt: skip

    _, got = jax.jit(lambda *a: jax.jvp(scored, a, tangents))(h, w, b)
    want = numpy_tangents(h, w, b, y, where, 0.7, tangents)
    for name, a, e in zip(("d log p", "d entropy"), got, want):
        np.testing.assert_allclose(np.asarray(a), e, rtol=2e-5, atol=2e-5, err_msg=name)

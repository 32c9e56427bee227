"""The fused preference losses with vocabulary-split classifiers, on 8 virtual CPU devices.

Run by ``tests/test_eight_devices.py`` in the same child pytest as the other multi-device
checks. ``sharded_linear_preference_loss`` on a 2 x 4 mesh (tokens over 2, vocabulary over 4,
37 classes padded to 40) against ``linear_preference_loss`` on one device: the loss, the
metrics and the gradients of the policy's hidden states, classifier and bias, for
conservative DPO with a reference model (its classifier and bias split like the policy's),
a temperature, packed rows in the halves layout and ``[d, V]`` classifiers. (One case: the
loss types differ only after the token log-probabilities, which test_preference.py checks.)
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxsoftmax import linear_preference_loss, sharded_linear_preference_loss

B, L, D, V = 4, 6, 8, 37


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() != 8:
        pytest.fail(f"these checks need 8 devices; got {jax.device_count()}.")


@functools.cache
def sample():
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    mask = np.ones((B, L), bool)
    mask[:, 0] = False  # the prompt
    mask[3, 4:] = False  # padding
    segments = np.array([[1, 1, 1, 2, 2, 0], [0, 1, 2, 2, 2, 2]] * 2, np.int32)
    return dict(
        hidden=normal(B, L, D), classifier=normal(V, D) / 2, bias=normal(V),
        reference_hidden=normal(B, L, 5), reference_classifier=normal(V, 5) / 2,
        reference_bias=normal(V), tokens=rng.integers(0, V, (B, L)).astype(np.int32),
        mask=mask, segments=segments,
    )  # fmt: skip


def test_sharded_preference_equals_one_device():
    x = sample()
    options = dict(
        segment_ids=x["segments"], num_segments=2, layout="halves", loss_type="sigmoid",
        beta=0.3, label_smoothing=0.1, temperature=0.8, classifier_layout="dv",
        reference=(x["reference_hidden"], x["reference_classifier"].T, x["reference_bias"]),
    )  # fmt: skip
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "vocab"))
    sharded = functools.partial(sharded_linear_preference_loss, mesh=mesh,
                                class_axis_name="vocab", batch_axis_name="batch")  # fmt: skip

    def both(h, c, b):
        results = []
        for loss in (sharded, linear_preference_loss):
            f = lambda h, c, b: loss(h, c.T, x["tokens"], bias=b, token_chunk=4, vocab_chunk=3,
                                     **options)  # fmt: skip
            results.append(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(h, c, b))
        return results

    got, want = jax.jit(both)(x["hidden"], x["classifier"], x["bias"])
    (loss, metrics), grads = got
    (want_loss, want_metrics), want_grads = want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(jax.tree.leaves(metrics), jax.tree.leaves(want_metrics)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    for a, e, name in zip(grads, want_grads, ("d hidden", "d classifier", "d bias")):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6, err_msg=name)
    assert metrics.pair_count == 4 and np.any(np.asarray(grads[1]))

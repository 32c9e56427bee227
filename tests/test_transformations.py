"""jit, vmap, grad of grad, shard_map / pmap (checked mode: tests/test_checking.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sample
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsoftmax import cross_entropy, softmax_cross_entropy_with_integer_labels

OPTIONS = dict(
    label_smoothing=0.1,
    class_weights=jnp.array([1.0, 2.0, 0.5, 1.0, 3.0]),
    z_loss=1e-3,
    logit_softcap=4.0,
    ignore_index=3,
)


def problem(seed=0, shape=(6, 5)):
    k1, k2 = sample.split(seed, 2)
    return sample.normal(k1, shape, scale=2.0), sample.integers(k2, shape[:-1], 0, shape[-1])


def test_jit_equals_eager_with_every_option():
    logits, labels = problem()
    for reduction in ("mean", "sum", "none"):
        f = functools.partial(cross_entropy, reduction=reduction, **OPTIONS)
        np.testing.assert_allclose(jax.jit(f)(logits, labels), f(logits, labels), rtol=1e-6)
        np.testing.assert_allclose(
            jax.jit(jax.grad(lambda z: jnp.sum(f(z, labels))))(logits),
            jax.grad(lambda z: jnp.sum(f(z, labels)))(logits),
            rtol=1e-6,
        )


def test_vmap_over_logits_and_targets_equals_the_batched_call():
    logits, labels = problem(1, (4, 3, 5))
    f = functools.partial(cross_entropy, reduction="none", **OPTIONS)
    np.testing.assert_allclose(jax.vmap(f)(logits, labels), f(logits, labels), rtol=1e-6)
    single = functools.partial(cross_entropy, reduction="sum", **OPTIONS)
    per_example = jax.vmap(jax.grad(single))(logits, labels)
    np.testing.assert_allclose(
        per_example, jax.grad(lambda z: jnp.sum(f(z, labels)))(logits), rtol=1e-6
    )
    probs = jax.nn.softmax(logits[::-1])
    np.testing.assert_allclose(
        jax.vmap(functools.partial(cross_entropy, reduction="none"))(logits, probs),
        cross_entropy(logits, probs, reduction="none"),
        rtol=1e-6,
    )


def test_vmap_over_targets_only():
    logits, labels = problem(2)
    many_labels = jnp.stack([labels, (labels + 1) % 5])
    out = jax.vmap(lambda y: cross_entropy(logits, y))(many_labels)
    np.testing.assert_allclose(out, [cross_entropy(logits, y) for y in many_labels], rtol=1e-6)


@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["plain", "all_options"])
def test_grad_of_grad_matches_autodiff_of_the_formula(options):
    """Reverse over reverse: the rule's own expression is differentiated again."""
    with jax.enable_x64(True):
        logits, labels = problem(3)
        logits = logits.astype(jnp.float64)
        opts = dict(options)
        if "class_weights" in opts:
            opts["class_weights"] = opts["class_weights"].astype(jnp.float64)
        f = functools.partial(cross_entropy, targets=labels, **opts)
        hessian = jax.jit(jax.jacrev(jax.grad(f)))(logits)

        def formula(z):
            eps, beta, cap = (
                opts.get("label_smoothing", 0.0),
                opts.get("z_loss", 0.0),
                opts.get("logit_softcap"),
            )
            w = opts.get("class_weights", jnp.ones(5, jnp.float64))
            if cap:
                z = cap * jnp.tanh(z / cap)
            kept = labels != opts.get("ignore_index", -1)
            q = w[None, :] * ((1 - eps) * jax.nn.one_hot(labels, 5, dtype=z.dtype) + eps / 5)
            lse = jax.nn.logsumexp(z, axis=-1)
            per = -jnp.sum(q * jax.nn.log_softmax(z), -1) + beta * w[labels] * lse**2
            return jnp.sum(jnp.where(kept, per, 0.0)) / jnp.sum(jnp.where(kept, w[labels], 0.0))

        want = jax.jit(jax.hessian(formula))(logits)
        np.testing.assert_allclose(hessian, want, rtol=1e-9, atol=1e-12)


def test_cross_entropy_is_reverse_mode_only_and_the_dropins_do_forward_mode():
    """As its docstring and docs/custom-gradients.md say: jvp / jacfwd of cross_entropy
    raise (custom_vjp), derivatives of its gradient work, and the drop-in names give the
    forward mode through the same rule."""
    logits, labels = problem(8, (3, 5))
    loss = lambda z: cross_entropy(z, labels, reduction="sum")
    with pytest.raises(TypeError, match="forward-mode autodiff .* custom_vjp"):
        jax.jvp(loss, (logits,), (jnp.ones_like(logits),))
    with pytest.raises(TypeError, match="forward-mode autodiff .* custom_vjp"):
        jax.jacfwd(loss)(logits)
    dropin = lambda z: jnp.sum(softmax_cross_entropy_with_integer_labels(z, labels))
    tangent = sample.normal(9, logits.shape)
    _, forward = jax.jvp(dropin, (logits,), (tangent,))
    np.testing.assert_allclose(forward, jnp.vdot(jax.grad(loss)(logits), tangent), rtol=1e-5)
    np.testing.assert_allclose(jax.jacfwd(dropin)(logits), jax.grad(loss)(logits), rtol=1e-6)
    # Forward over reverse differentiates the rule itself: the softmax Jacobian per row.
    hessian = jax.hessian(loss)(logits)
    np.testing.assert_allclose(hessian, jax.hessian(dropin)(logits), rtol=1e-5, atol=1e-7)
    s = np.asarray(jax.nn.softmax(logits), np.float64)
    np.testing.assert_allclose(hessian[1, :, 1, :], np.diag(s[1]) - np.outer(s[1], s[1]), atol=1e-6)


def test_inside_shard_map_and_pmap_without_global_shapes():
    logits, labels = problem(4, (8, 5))
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P("batch")
    )
    def per_shard(z, y):
        return cross_entropy(z, y, reduction="none", **OPTIONS)

    expected = cross_entropy(logits, labels, reduction="none", **OPTIONS)
    np.testing.assert_allclose(jax.jit(per_shard)(logits, labels), expected, rtol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(per_shard(z, labels)))(logits)
    np.testing.assert_allclose(
        grad,
        jax.grad(lambda z: jnp.sum(cross_entropy(z, labels, reduction="none", **OPTIONS)))(logits),
        rtol=1e-6,
    )
    pmapped = jax.pmap(lambda z, y: cross_entropy(z, y, **OPTIONS))
    out = pmapped(logits[None], labels[None])
    np.testing.assert_allclose(out[0], cross_entropy(logits, labels, **OPTIONS), rtol=1e-6)


def test_unchecked_out_of_range_label_is_nan_not_a_plausible_number():
    logits, _ = problem(7, (3, 4))
    value = jax.jit(cross_entropy)(logits, jnp.array([0, 4, 1]))
    assert jnp.isnan(value)

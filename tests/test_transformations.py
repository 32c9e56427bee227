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
    class_weights=np.array([1.0, 2.0, 0.5, 1.0, 3.0], np.float32),
    z_loss=1e-3,
    logit_softcap=4.0,
    ignore_index=3,
)


def problem(seed=0, shape=(6, 5)):
    """NumPy logits and labels (no program compiled to draw them: tests/sample.py)."""
    k1, k2 = sample.split(seed, 2)
    logits = sample.numpy_normal(k1, shape, scale=2.0)
    return logits, sample.numpy_integers(k2, shape[:-1], 0, shape[-1])


REDUCTIONS = ("mean", "sum", "none")


def value_and_grad_per_reduction(logits, labels):
    """Each reduction's value and the gradient of its sum, with every option."""
    results = {}
    for reduction in REDUCTIONS:
        f = functools.partial(cross_entropy, reduction=reduction, **OPTIONS)
        results[reduction] = (f(logits, labels), jax.grad(lambda z: jnp.sum(f(z, labels)))(logits))
    return results


def test_jit_equals_eager_with_every_option():
    """Eager calls (each reduction on its own) against one jitted program of all three."""
    logits, labels = jax.device_put(problem())  # as users call it: jax.Arrays
    eager = value_and_grad_per_reduction(logits, labels)
    jitted = jax.jit(value_and_grad_per_reduction)(logits, labels)
    for reduction in REDUCTIONS:
        for what, got, want in zip(("value", "gradient"), jitted[reduction], eager[reduction]):
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{reduction} {what}")


def test_vmap_over_logits_and_targets_equals_the_batched_call():
    """The vmapped calls and the batched ones, in one program."""
    logits, labels = problem(1, (4, 3, 5))
    z = logits.astype(np.float64)[::-1]
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    f = functools.partial(cross_entropy, reduction="none", **OPTIONS)
    single = functools.partial(cross_entropy, reduction="sum", **OPTIONS)
    unreduced = functools.partial(cross_entropy, reduction="none")

    def mapped_and_batched(logits, labels, probs):
        return {
            "labels": (jax.vmap(f)(logits, labels), f(logits, labels)),
            "per-example gradients": (
                jax.vmap(jax.grad(single))(logits, labels),
                jax.grad(lambda z: jnp.sum(f(z, labels)))(logits),
            ),
            "probabilities": (jax.vmap(unreduced)(logits, probs), unreduced(logits, probs)),
        }

    for case, (mapped, batched) in jax.jit(mapped_and_batched)(logits, labels, probs).items():
        np.testing.assert_allclose(mapped, batched, rtol=1e-6, err_msg=case)


def test_vmap_over_targets_only():
    logits, labels = problem(2)
    many_labels = np.stack([labels, (labels + 1) % 5])

    def mapped_and_each(many_labels):
        mapped = jax.vmap(lambda y: cross_entropy(logits, y))(many_labels)
        return mapped, [cross_entropy(logits, y) for y in many_labels]

    out, each = jax.jit(mapped_and_each)(many_labels)
    np.testing.assert_allclose(out, each, rtol=1e-6)


@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["plain", "all_options"])
def test_grad_of_grad_matches_autodiff_of_the_formula(options):
    """Reverse over reverse: the rule's own expression is differentiated again."""
    with jax.enable_x64(True):
        logits, labels = problem(3)
        logits = logits.astype(np.float64)
        opts = dict(options)
        if "class_weights" in opts:
            opts["class_weights"] = np.asarray(opts["class_weights"], np.float64)
        f = functools.partial(cross_entropy, targets=labels, **opts)

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

        # ours (reverse over reverse) and the formula's Hessian, in one program
        hessian, want = jax.jit(lambda z: (jax.jacrev(jax.grad(f))(z), jax.hessian(formula)(z)))(
            logits
        )
        np.testing.assert_allclose(hessian, want, rtol=1e-9, atol=1e-12)


def test_cross_entropy_is_reverse_mode_only_and_the_dropins_do_forward_mode():
    """As its docstring and docs/custom-gradients.md say: jvp / jacfwd of cross_entropy
    raise (custom_vjp), derivatives of its gradient work, and the drop-in names give the
    forward mode through the same rule."""
    logits, labels = problem(8, (3, 5))
    loss = lambda z: cross_entropy(z, labels, reduction="sum")
    logits = jax.device_put(logits)  # as users call it: a jax.Array
    with pytest.raises(TypeError, match="forward-mode autodiff .* custom_vjp"):
        jax.jvp(loss, (logits,), (np.ones_like(logits),))
    with pytest.raises(TypeError, match="forward-mode autodiff .* custom_vjp"):
        jax.jacfwd(loss)(logits)
    dropin = lambda z: jnp.sum(softmax_cross_entropy_with_integer_labels(z, labels))
    tangent = sample.numpy_normal(9, logits.shape)

    def derivatives(logits, tangent):  # all in one program
        return {
            "forward": jax.jvp(dropin, (logits,), (tangent,))[1],
            "jacfwd": jax.jacfwd(dropin)(logits),
            "grad": jax.grad(loss)(logits),
            "hessian": jax.hessian(loss)(logits),
            "dropin_hessian": jax.hessian(dropin)(logits),
        }

    d = {k: np.asarray(v) for k, v in jax.jit(derivatives)(logits, tangent).items()}
    np.testing.assert_allclose(d["forward"], np.vdot(d["grad"], tangent), rtol=1e-5)
    np.testing.assert_allclose(d["jacfwd"], d["grad"], rtol=1e-6)
    # Forward over reverse differentiates the rule itself: the softmax Jacobian per row.
    hessian = d["hessian"]
    np.testing.assert_allclose(hessian, d["dropin_hessian"], rtol=1e-5, atol=1e-7)
    z = np.asarray(logits, np.float64)
    s = np.exp(z - z.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    np.testing.assert_allclose(hessian[1, :, 1, :], np.diag(s[1]) - np.outer(s[1], s[1]), atol=1e-6)


def test_inside_shard_map_and_pmap_without_global_shapes():
    logits, labels = problem(4, (8, 5))
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P("batch")
    )
    def per_shard(z, y):
        return cross_entropy(z, y, reduction="none", **OPTIONS)

    def sharded_and_whole(logits, labels):  # one program
        whole = lambda z: cross_entropy(z, labels, reduction="none", **OPTIONS)
        return {
            "per-example losses": (per_shard(logits, labels), whole(logits)),
            "gradient": (
                jax.grad(lambda z: jnp.sum(per_shard(z, labels)))(logits),
                jax.grad(lambda z: jnp.sum(whole(z)))(logits),
            ),
            "mean": cross_entropy(logits, labels, **OPTIONS),
        }

    results = jax.jit(sharded_and_whole)(logits, labels)
    for case in ("per-example losses", "gradient"):
        np.testing.assert_allclose(*results[case], rtol=1e-6, err_msg=case)
    pmapped = jax.pmap(lambda z, y: cross_entropy(z, y, **OPTIONS))
    out = pmapped(logits[None], labels[None])
    np.testing.assert_allclose(np.asarray(out)[0], results["mean"], rtol=1e-6)


def test_unchecked_out_of_range_label_is_nan_not_a_plausible_number():
    logits, _ = problem(7, (3, 4))
    value = jax.jit(cross_entropy)(logits, np.array([0, 4, 1], np.int32))
    assert np.isnan(value)


def test_one_program_takes_a_computation_of_one_argument():
    """``one_program`` jits ``compute(*args)`` whatever its number of parameters (a compute
    of one once failed: jax.jit read its signature through functools.wraps)."""
    from jaxsoftmax.losses.one_program import one_program

    doubled = one_program(lambda x: 2 * x)
    np.testing.assert_array_equal(doubled(np.arange(3.0)), [0.0, 2.0, 4.0])

"""The worst cases of docs/numerics.md, at the smallest shapes that show them.

Each test rounds its inputs to bf16 or float16, computes the exact answer in float64 from those
rounded values (``reference``, NumPy), and bounds our error by the dtype's unit roundoff ``u``
(2^-8 for bf16, 2^-11 for float16, 2^-24 for float32, half the gap between 1 and the next
number). The bounds follow from what the library does: it widens narrow inputs exactly to
float32, computes in float32 and rounds once, to the inputs' dtype. So

* a loss (or log-probability) rounded to the dtype is off by at most ``u`` relative to itself,
  plus the float32 part: a sum of ``V`` exponentials and a logarithm, each step off by at most
  ``u32`` relative, at most ``V u32`` relative in all, so ``8 V u32`` (of ``max(|loss|, 1)``:
  one nat absolute below one nat) is a safe margin (:func:`value_bound`);
* a gradient ``p - onehot`` (or ``p - q``) is computed in float32 and rounded once, so each
  entry is off by at most ``u`` of itself plus the float32 part: at most ``u + 8 V u32`` times
  the size of the terms it is the difference of, ``p + onehot`` (:func:`gradient_error`); the
  fused loss rounds the logits' gradient to the inputs' dtype before its products (as the
  naive composition does) and rounds the products once more: ``2 u + 8 V u32``.

optax computes in the inputs' dtype. Where it is worse, the tests assert that it is at least
10 or 20 times worse than ours on the same inputs (they find 30 to 560 times), so a change that
loses our advantage fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import jaxsoftmax

UNIT_ROUNDOFF = {jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11, jnp.float32: 2.0**-24}
U32 = UNIT_ROUNDOFF[jnp.float32]


def value_bound(dtype, num_classes: int) -> float:
    """Rounding to ``dtype`` once, after float32's sum over ``num_classes``."""
    return UNIT_ROUNDOFF[dtype] + 8 * num_classes * U32


def value_error(x, exact) -> float:
    """``max |x - x64| / max(|x64|, 1)``: relative, in nats below one nat; inf if not finite."""
    x, exact = np.asarray(x, np.float64), np.asarray(exact, np.float64)
    error = np.abs(x - exact) / np.maximum(np.abs(exact), 1.0)
    return float(np.max(np.where(np.isfinite(x), error, np.inf)))


def gradient_error(g, exact, size) -> float:
    """``max |g - g64| / max size``, ``size`` the sum of the absolute terms of ``g64``."""
    g = np.asarray(g, np.float64)
    if not np.all(np.isfinite(g)):
        return np.inf
    return float(np.max(np.abs(g - exact)) / np.max(size))


def rounded(x, dtype):
    """``x`` rounded to ``dtype`` (a device array) and its exact float64 values."""
    low = jax.device_put(np.asarray(x, np.float32).astype(dtype))
    return low, np.asarray(low, np.float64)


def softmax_terms(z, labels):
    """float64 ``p`` and ``onehot`` of rows of logits."""
    log_p, _ = reference.log_softmax(z)
    return np.exp(log_p), np.eye(z.shape[-1])[labels]


def optax_side(fn):
    """optax with JAX's default promotion (it relies on rank promotion; the suite is strict)."""

    def wrapped(*args):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            return fn(*args)

    return wrapped


OPTAX_INT = optax_side(optax.softmax_cross_entropy_with_integer_labels)


def drifted_logits(dtype, rows=8, classes=128, seed=0):
    """Logits drifted to 1000 (``1000 + 4 N(0, 1)``, a few nats of loss), labels sampled from
    their softmax: bf16 holds them to 4 (its spacing is 8 there), float16 to 0.5."""
    rng = np.random.default_rng(seed)
    z, z64 = rounded(1000.0 + 4.0 * rng.standard_normal((rows, classes)), dtype)
    labels = np.argmax(z64 + rng.gumbel(size=z64.shape), axis=-1).astype(np.int32)
    return z, z64, labels


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_drifted_logits_lose_nothing_to_the_logsumexp(dtype):
    """At logits of magnitude 1000 and a loss of a few nats, ``lse(z) - z_y`` rounded to bf16
    (optax) loses ``u * 1000`` nats: the whole loss. We keep ``m`` and ``log sum exp(z - m)``
    apart, so the loss is only rounded once: within ``u`` of itself. The gradient too."""
    z, z64, labels = drifted_logits(dtype)
    exact = reference.cross_entropy(z64, labels, reduction="none")
    p, onehot = softmax_terms(z64, labels)

    @jax.jit
    def losses(z):
        rows, pullback = jax.vjp(jaxsoftmax.softmax_cross_entropy_with_integer_labels, z, labels)
        grad = pullback(jnp.ones_like(rows))[0]
        return rows, grad, jaxsoftmax.cross_entropy(z, labels), OPTAX_INT(z, labels)

    rows, grad, mean, theirs = losses(z)

    bound = value_bound(dtype, z.shape[-1])
    assert value_error(rows, exact) <= bound
    assert value_error(mean, exact.mean()) <= bound
    assert gradient_error(grad, p - onehot, p + onehot) <= bound
    assert value_error(theirs, exact) > 20 * value_error(rows, exact)  # 390 and 560 times


def test_float16_mean_loss_beyond_float16s_range():
    """Logits of +-40,000 in float16: the rows' losses reach 80,000, beyond float16's 65,504.
    Each row's loss in float16 is then inf (the nearest float16, correctly), but the mean,
    computed in float32 and rounded once, is finite and within ``u`` of the exact mean, and so
    is its gradient. optax's rows overflow, and so does its mean; so does ``log_softmax`` of
    float16, whose ``z - max`` itself overflows."""
    z64 = np.zeros((4, 16))
    z64[:, 0], z64[:, 1] = 40000.0, -40000.0  # the label at -40,000: a loss of 80,000
    z, z64 = rounded(z64, jnp.float16)
    labels = np.array([1, 0, 2, 3], np.int32)
    exact = reference.cross_entropy(z64, labels, reduction="none")
    assert exact[0] > np.finfo(np.float16).max and exact.mean() < np.finfo(np.float16).max

    @jax.jit
    def losses(z):
        mean, grad = jax.value_and_grad(jaxsoftmax.cross_entropy)(z, labels)
        rows = jaxsoftmax.softmax_cross_entropy_with_integer_labels(z, labels)
        return mean, grad, rows, jnp.mean(OPTAX_INT(z, labels)), jax.nn.log_softmax(z)

    mean, grad, rows, optax_mean, log_softmax = losses(z)
    p, onehot = softmax_terms(z64, labels)

    bound = value_bound(jnp.float16, z.shape[-1])
    assert value_error(mean, exact.mean()) <= bound
    assert gradient_error(grad, (p - onehot) / 4, (p + onehot) / 4) <= bound
    assert np.isposinf(rows[0]) and value_error(rows[1:], exact[1:]) <= bound
    assert np.isposinf(optax_mean)
    assert np.isneginf(log_softmax[0, 1])


def test_float16_sum_of_exponentials_beyond_float16s_range():
    """70,000 classes of float16 logits close to their maximum: ``sum exp(z - max)`` exceeds
    65,504. JAX's ``logsumexp`` and ``log_softmax`` sum in float32 but round the sum to
    float16, which overflows: optax's loss is inf, though the loss is 11 nats. Ours keeps the
    sum in float32 and rounds only the loss."""
    rng = np.random.default_rng(3)
    z, z64 = rounded(rng.standard_normal((2, 70000)) / 1024, jnp.float16)
    labels = np.array([0, 1], np.int32)
    exact = reference.cross_entropy(z64, labels, reduction="none")

    @jax.jit
    def losses(z):
        return jaxsoftmax.softmax_cross_entropy_with_integer_labels(z, labels), OPTAX_INT(z, labels)

    rows, theirs = losses(z)
    assert value_error(rows, exact) <= value_bound(jnp.float16, z.shape[-1])
    assert np.all(np.isposinf(theirs))


def test_bf16_teacher_gradient_where_its_softmax_underflows():
    """A teacher whose logits spread over +-300 in bf16: most of its probabilities underflow to
    0, where optax's ``kl_divergence`` differentiates ``log(q)`` and gives NaN to the teacher.
    The derived rule's ``q (log q - log p - KL)`` is finite and within ``u`` of the exact
    gradient, for the teacher and the student."""
    rng = np.random.default_rng(1)
    s, s64 = rounded(100.0 * rng.standard_normal((4, 64)), jnp.bfloat16)
    t, t64 = rounded(100.0 * rng.standard_normal((4, 64)), jnp.bfloat16)
    log_p, _ = reference.log_softmax(s64)
    log_q, _ = reference.log_softmax(t64)
    p, q = np.exp(log_p), np.exp(log_q)
    kl = np.sum(q * (log_q - log_p), axis=-1, keepdims=True)

    @jax.jit
    def gradients(s, t):
        ours = jax.value_and_grad(jaxsoftmax.distillation_loss, (0, 1))(s, t)
        kl = lambda t: jnp.mean(optax.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t)))
        return ours, jax.grad(optax_side(kl))(t)

    (loss, (d_s, d_t)), optax_teacher = gradients(s, t)

    bound = value_bound(jnp.bfloat16, 64)
    assert value_error(loss, reference.distillation(s64, t64)) <= bound
    assert gradient_error(d_s, (p - q) / 4, (p + q) / 4) <= bound
    exact_teacher = q * (log_q - log_p - kl) / 4
    assert gradient_error(d_t, exact_teacher, q * (np.abs(log_q - log_p) + np.abs(kl)) / 4) <= bound
    assert not np.all(np.isfinite(np.asarray(optax_teacher, np.float32)))


def test_bf16_log_probs_exact_to_float32():
    """``token_log_probs`` of bf16 logits returns float32, computed from the exactly widened
    logits: off by float32's rounding only (``8 V u32``), where ``log_softmax`` in bf16 is off
    by bf16's (its result is bf16). Likewise the entropy. The entropy's gradient ``-p (log p +
    H)``, rounded once to bf16, is within ``u`` of the size of its terms."""
    z, z64, labels = drifted_logits(jnp.bfloat16)

    @jax.jit
    def log_probs(z):
        naive = jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], -1)[:, 0]
        (log_p, entropy), pullback = jax.vjp(
            lambda z: jaxsoftmax.token_log_probs(z, labels, return_entropy=True), z
        )
        return log_p, entropy, pullback((jnp.zeros_like(log_p), jnp.ones_like(entropy)))[0], naive

    log_p, entropy, d_entropy, naive = log_probs(z)
    exact_log_p, _ = reference.log_softmax(z64)
    p = np.exp(exact_log_p)
    exact_entropy = -np.sum(p * exact_log_p, -1)

    bound = 8 * z.shape[-1] * U32
    assert log_p.dtype == entropy.dtype == jnp.float32
    assert value_error(log_p, exact_log_p[np.arange(8), labels]) <= bound
    assert value_error(entropy, exact_entropy) <= bound
    log_p_plus_h = exact_log_p + exact_entropy[:, None]
    size = p * (np.abs(exact_log_p) + exact_entropy[:, None])
    assert gradient_error(d_entropy, -p * log_p_plus_h, size) <= value_bound(jnp.bfloat16, 128)
    assert naive.dtype == jnp.bfloat16  # rounded to bf16: 60 times our error here
    assert value_error(naive, exact_log_p[np.arange(8), labels]) > 10 * bound


def test_fused_loss_of_drifted_bf16_logits():
    """``linear_cross_entropy`` of bf16 hidden states whose logits drift to 1000 (one hidden
    unit of ``sqrt(1000)`` in every token and class): the logits of each tile are summed in
    float32 from the exact products of bf16 numbers and never rounded to bf16, so the loss is
    within ``u`` of the exact loss of the rounded inputs, and the gradients within ``2 u`` of
    the size of their terms (see the module docstring). optax's loss of the bf16 logits
    ``h @ w.T``, and its gradients, are not: the logits themselves are rounded to bf16."""
    rng = np.random.default_rng(2)
    n, v, d = 8, 128, 8
    column = lambda rows: np.full((rows, 1), np.sqrt(1000.0))
    h, h64 = rounded(np.hstack([column(n), 2.0 * rng.standard_normal((n, d - 1))]), jnp.bfloat16)
    w, w64 = rounded(np.hstack([column(v), rng.standard_normal((v, d - 1))]), jnp.bfloat16)
    z64 = h64 @ w64.T
    labels = np.argmax(z64 + rng.gumbel(size=z64.shape), axis=-1).astype(np.int32)
    exact = reference.cross_entropy(z64, labels)
    p, onehot = softmax_terms(z64, labels)
    g, size = (p - onehot) / n, (p + onehot) / n

    @jax.jit
    def losses(h, w):
        ours = jax.value_and_grad(jaxsoftmax.linear_cross_entropy, (0, 1))(h, w, labels)
        optax_loss = lambda h, w: jnp.mean(OPTAX_INT(h @ w.T, labels))
        return ours, jax.value_and_grad(optax_loss, (0, 1))(h, w)

    (loss, (d_h, d_w)), (theirs, (their_d_h, their_d_w)) = losses(h, w)

    bound = value_bound(jnp.bfloat16, v)
    assert value_error(loss, exact) <= bound
    gradient_bound = 2 * UNIT_ROUNDOFF[jnp.bfloat16] + 8 * v * U32
    exact_h, size_h = g @ w64, size @ np.abs(w64)
    exact_w, size_w = g.T @ h64, size.T @ np.abs(h64)
    assert gradient_error(d_h, exact_h, size_h) <= gradient_bound
    assert gradient_error(d_w, exact_w, size_w) <= gradient_bound
    assert value_error(theirs, exact) > 20 * value_error(loss, exact)
    # optax differentiates the logits rounded to bf16 (by up to 4 at 1000): 30 and 400 times
    assert gradient_error(their_d_h, exact_h, size_h) > 10 * gradient_error(d_h, exact_h, size_h)
    assert gradient_error(their_d_w, exact_w, size_w) > 10 * gradient_error(d_w, exact_w, size_w)

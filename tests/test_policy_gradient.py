"""policy_gradient_loss: values, gradients and metrics against independent references.

References, written here from the definitions (TRL's ``GRPOTrainer._compute_loss`` and
verl's ``core_algos`` formulas, the GSPO, CISPO and Dr. GRPO papers), never from the
library's code: float64 NumPy values, metrics and closed-form gradients (:func:`reference`),
``jax.grad`` of the naive composition as those libraries write it (:func:`naive`: products
with a 0/1 mask, ``jnp.minimum`` of the two surrogates, TRL's sequence ratio differentiated
through its mean), and central differences. Every case runs in one compiled program
(:func:`_program`), reused for the inputs with garbage in the padding and with no token.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sample

from jaxsoftmax.checks.policy_call import check_policy_call
from jaxsoftmax.losses.policy_gradient import PolicyGradientMetrics, policy_gradient_loss

B, L = 4, 6
# Row 0 full, row 1 three tokens, row 2 one, row 3 with a hole (a tool's output, say).
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 1, 1, 0]], bool)  # fmt: skip
REF = {"ref_log_probs": "ref"}
ENTROPY = {"entropy": "entropy"}
# Each case: the loss's options; "advantages": "token" takes the [B, L] advantages, "old":
# None the on-policy step, "ref"/"entropy" the arrays of the same name.
CASES = {
    "grpo": dict(),
    "dapo": dict(normalization="token_mean", epsilon_high=0.28),
    "dapo_whole_batch_count": dict(normalization="token_mean", num_tokens=25),
    "grpo_whole_batch_count": dict(num_sequences=7),
    "dr_grpo": dict(normalization="fixed_length", max_length=8),
    "gspo": dict(importance_level="sequence", epsilon_low=0.1, epsilon_high=0.15),
    "gspo_paper_epsilons": dict(importance_level="sequence", epsilon_low=3e-4,
                                epsilon_high=4e-4, normalization="token_mean"),
    "gspo_token_advantages": dict(importance_level="sequence", epsilon_low=0.1,
                                  epsilon_high=0.15, advantages="token"),
    "cispo": dict(objective="cispo", normalization="token_mean", epsilon_high=0.3),
    "cispo_sequence": dict(objective="cispo", importance_level="sequence", epsilon_high=0.05),
    "ppo_dual_clip": dict(advantages="token", dual_clip=1.4, epsilon_low=0.1,
                          normalization="token_mean"),
    "kl_k1": dict(**REF, kl_coef=0.1, kl_estimator="k1"),
    "kl_k2_dr_grpo": dict(**REF, kl_coef=0.2, kl_estimator="k2",
                          normalization="fixed_length", max_length=6),
    "kl_k3_entropy": dict(**REF, **ENTROPY, kl_coef=0.04, entropy_coef=0.01,
                          normalization="token_mean"),
    "metrics_only": dict(**REF, **ENTROPY, kl_estimator="k2"),
    "on_policy": dict(old=None),
    "on_policy_sequence_cispo": dict(old=None, objective="cispo", importance_level="sequence",
                                     normalization="fixed_length", max_length=6),
}  # fmt: skip
# Central differences: the step along a random direction and the float64 tolerance.
STEP, TOLERANCE = 1e-5, 1e-7


def _data():
    """Float64 NumPy inputs: ratios from about 0.4 to 2.5, advantages of both signs."""
    keys = sample.split(0, 6)
    log_probs = -np.abs(sample.numpy_normal(keys[0], (B, L), np.float64)) - 0.05
    return dict(
        log_probs=log_probs,
        old=log_probs + sample.numpy_normal(keys[1], (B, L), np.float64, scale=0.4),
        advantages=np.array([1.0, -0.7, 0.5, -1.3]),
        token=sample.numpy_normal(keys[2], (B, L), np.float64),
        ref=log_probs + sample.numpy_normal(keys[3], (B, L), np.float64, scale=0.3),
        entropy=sample.numpy_uniform(keys[4], (B, L), np.float64, low=0.1, high=2.0),
        mask=MASK,
        direction=sample.numpy_normal(keys[5], (B, L), np.float64),
    )


def arguments(case: str, data: dict):
    """``(old_log_probs, advantages, keywords)`` of a case, arrays taken from ``data``."""
    options = dict(CASES[case])
    old = data["old"] if options.pop("old", "old") is not None else None
    advantages = data[options.pop("advantages", "advantages")]
    for name in ("ref_log_probs", "entropy"):
        if name in options:
            options[name] = data[options[name]]
    return old, advantages, dict(options, mask=data["mask"])


def naive(log_probs, old, advantages, *, mask, objective="ppo", normalization="sequence_mean",
          importance_level="token", epsilon_low=0.2, epsilon_high=None, dual_clip=None,
          max_length=None, num_tokens=None, num_sequences=None, ref_log_probs=None,
          kl_coef=0.0, kl_estimator="k3", entropy=None, entropy_coef=0.0):  # fmt: skip
    """The loss as TRL and verl write it, for ``jax.grad``."""
    sg = jax.lax.stop_gradient
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    m = mask.astype(log_probs.dtype)
    old = sg(log_probs) if old is None else old
    a = advantages[:, None] if advantages.ndim == 1 else advantages
    coef = jnp.exp(log_probs - old)
    if importance_level == "sequence":
        mean = jnp.sum((log_probs - old) * m, 1, keepdims=True) / jnp.sum(m, 1, keepdims=True)
        # TRL: the sequence's ratio itself; with per-token advantages, GSPO-token.
        coef = jnp.exp(mean) if a.shape[1] == 1 else jnp.exp(sg(mean) + log_probs - sg(log_probs))
    if objective == "cispo":
        per_token = -sg(jnp.minimum(coef, 1 + epsilon_high)) * a * log_probs
    else:
        per_token = -jnp.minimum(coef * a, jnp.clip(coef, 1 - epsilon_low, 1 + epsilon_high) * a)
        if dual_clip is not None:
            per_token = jnp.where(a < 0, jnp.minimum(per_token, -dual_clip * a), per_token)
    if kl_coef:
        delta = ref_log_probs - log_probs
        kl = {"k1": -delta, "k2": delta**2 / 2, "k3": jnp.exp(delta) - delta - 1}[kl_estimator]
        per_token = per_token + kl_coef * kl
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    total = jnp.sum(per_token * m)
    sequences = B if num_sequences is None else num_sequences
    if normalization == "token_mean":
        return total / (jnp.sum(m) if num_tokens is None else num_tokens)
    if normalization == "fixed_length":
        return total / (sequences * max_length)
    return jnp.sum(jnp.sum(per_token * m, 1) / jnp.sum(m, 1)) / sequences


def reference(log_probs, old, advantages, *, mask, objective="ppo", normalization="sequence_mean",
              importance_level="token", epsilon_low=0.2, epsilon_high=None, dual_clip=None,
              max_length=None, num_tokens=None, num_sequences=None, ref_log_probs=None,
              kl_coef=0.0, kl_estimator="k3", entropy=None, entropy_coef=0.0):  # fmt: skip
    """Float64 NumPy: ``(loss, gradient with respect to log_probs, metrics as a dict)``."""
    eh = epsilon_low if epsilon_high is None else epsilon_high
    old = log_probs if old is None else old
    a = np.broadcast_to(advantages[:, None] if advantages.ndim == 1 else advantages, (B, L))
    n = mask.sum(1, keepdims=True)
    d = np.where(mask, log_probs - old, 0.0)
    r = np.exp(d.sum(1, keepdims=True) / n if importance_level == "sequence" else d) * np.ones(
        (B, L)
    )
    if objective == "cispo":
        weight = np.minimum(r, 1 + eh)
        loss, grad = -weight * a * log_probs, -weight * a
        low, high, dual = np.zeros((B, L), bool), r > 1 + eh, np.zeros((B, L), bool)
    else:
        low, high = (a < 0) & (r < 1 - epsilon_low), (a > 0) & (r > 1 + eh)
        dual = (a < 0) & (r > dual_clip) if dual_clip else np.zeros((B, L), bool)
        loss = -np.minimum(r * a, np.clip(r, 1 - epsilon_low, 1 + eh) * a)
        loss = np.where(dual, -dual_clip * a, loss) if dual_clip else loss
        grad = np.where(low | high | dual, 0.0, -a * r)  # d(-A r)/d log p = -A r, both levels
    kl = None
    if ref_log_probs is not None:
        delta = ref_log_probs - log_probs
        kl = {"k1": -delta, "k2": delta**2 / 2, "k3": np.exp(delta) - delta - 1}[kl_estimator]
        kl_grad = {"k1": 1.0, "k2": -delta, "k3": 1 - np.exp(delta)}[kl_estimator]
        loss, grad = loss + kl_coef * kl, grad + kl_coef * kl_grad
    if entropy is not None:
        loss = loss - entropy_coef * entropy
    g = B if num_sequences is None else num_sequences
    scale = {"token_mean": 1 / (mask.sum() if num_tokens is None else num_tokens) * np.ones((B, 1)),
             "fixed_length": np.full((B, 1), 1 / (g * (max_length or 1))),
             "sequence_mean": 1 / (g * n)}[normalization]  # fmt: skip
    counted = lambda x: x[mask]
    metrics = dict(
        clip_fraction=counted(low | high | dual).mean(), low_clip_fraction=counted(low).mean(),
        high_clip_fraction=counted(high).mean(), dual_clip_fraction=counted(dual).mean(),
        ratio_mean=counted(r).mean(), ratio_min=counted(r).min(), ratio_max=counted(r).max(),
        kl_mean=None if kl is None else counted(kl).mean(),
        entropy_mean=None if entropy is None else counted(entropy).mean(),
        token_count=mask.sum(),
    )  # fmt: skip
    return np.sum(np.where(mask, loss, 0.0) * scale), np.where(mask, grad, 0.0) * scale, metrics


@functools.cache
def _program():
    """Every case in one jitted function of the inputs: ours (value, metrics, gradient), the
    naive composition's value and gradient, and ours one step either side along
    ``direction`` (the old policy held at ``log_probs`` for the on-policy cases)."""

    def every(data):
        results = {}
        for case in CASES:
            old, advantages, options = arguments(case, data)
            ours = lambda x: policy_gradient_loss(x, old, advantages, **options)
            held = data["log_probs"] if old is None else old
            stepped = lambda x: policy_gradient_loss(x, held, advantages, **options)[0]
            (value, metrics), grad = jax.value_and_grad(ours, has_aux=True)(data["log_probs"])
            naive_value, naive_grad = jax.value_and_grad(
                lambda x: naive(x, old, advantages, **options)
            )(data["log_probs"])
            steps = [stepped(data["log_probs"] + k * STEP * data["direction"]) for k in (1, -1)]
            results[case] = dict(value=value, metrics=metrics, grad=grad, naive=naive_value,
                                 naive_grad=naive_grad, steps=steps)  # fmt: skip
        return results

    return jax.jit(every)


def _run(data):
    with jax.enable_x64(True):
        return jax.device_get(_program()(data))


@functools.cache
def _clean_results():
    return _run(_data())


@pytest.mark.parametrize("case", CASES)
def test_value_gradient_and_metrics_equal_the_references(case):
    """Value and metrics vs float64 NumPy; the gradient vs the closed form and ``jax.grad``
    of the naive composition; the value vs the naive one."""
    data = _data()
    result = _clean_results()[case]
    old, advantages, options = arguments(case, data)
    loss, grad, metrics = reference(data["log_probs"], old, advantages, **options)
    np.testing.assert_allclose(result["value"], loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result["value"], result["naive"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result["grad"], grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result["grad"], result["naive_grad"], rtol=1e-12, atol=1e-14)
    assert isinstance(result["metrics"], PolicyGradientMetrics)
    for name, expected in metrics.items():
        got = getattr(result["metrics"], name)
        if expected is None:
            assert got is None, name
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=name)


def test_the_references_see_every_clip():
    """The data clip tokens of each kind somewhere, and leave others unclipped, so that the
    comparisons above test each branch."""
    results = _clean_results()
    for name in ("low_clip_fraction", "high_clip_fraction"):
        assert 0 < getattr(results["grpo"]["metrics"], name) < 1, name
    assert 0 < results["ppo_dual_clip"]["metrics"].dual_clip_fraction < 1
    assert 0 < results["gspo"]["metrics"].clip_fraction < 1
    assert 0 < results["cispo"]["metrics"].high_clip_fraction < 1
    assert 0 < results["gspo_paper_epsilons"]["metrics"].clip_fraction < 1


@pytest.mark.parametrize("case", [c for c in CASES if "cispo" not in c and "token_adv" not in c])
def test_gradient_equals_central_differences(case):
    """Where the gradient is the derivative of the value (not CISPO, whose weight has no
    gradient, nor GSPO-token with per-token advantages): the directional derivative along a
    random direction, ``(f(x + h v) - f(x - h v)) / 2h``, equals ``<grad, v>``."""
    result, direction = _clean_results()[case], _data()["direction"]
    finite = (result["steps"][0] - result["steps"][1]) / (2 * STEP)
    np.testing.assert_allclose(np.sum(result["grad"] * direction), finite, rtol=TOLERANCE,
                               atol=TOLERANCE)  # fmt: skip


def test_on_policy_value_and_gradient():
    """``old_log_probs=None``: the ratio is 1, the value ``-A`` normalized and the gradient
    ``-A grad log p`` over the normalizer; CISPO's value ``-A log p``, same gradient."""
    data, results = _data(), _clean_results()
    a = np.broadcast_to(data["advantages"][:, None], (B, L))
    n = MASK.sum(1, keepdims=True)
    expected = np.where(MASK, -a / (B * n), 0.0)
    np.testing.assert_allclose(results["on_policy"]["grad"], expected, rtol=1e-13)
    np.testing.assert_allclose(results["on_policy"]["value"], expected.sum(), rtol=1e-13)
    cispo = results["on_policy_sequence_cispo"]
    np.testing.assert_allclose(cispo["grad"], np.where(MASK, -a / (B * L), 0.0), rtol=1e-13)
    np.testing.assert_allclose(cispo["value"], np.sum(cispo["grad"] * data["log_probs"]),
                               rtol=1e-13)  # fmt: skip
    assert (
        results["on_policy"]["metrics"].ratio_min == results["on_policy"]["metrics"].ratio_max == 1
    )


def test_padding_reaches_neither_value_nor_gradient():
    """NaN and infinities off the mask, in every per-token input: the same loss, metrics
    and gradient (0 off the mask) as with clean padding. Same program as above."""
    clean, data = _clean_results(), _data()
    for name, fill in (("log_probs", -np.inf), ("old", np.nan), ("token", np.inf),
                       ("ref", np.nan), ("entropy", np.nan)):  # fmt: skip
        data[name] = np.where(MASK, data[name], fill)
    dirty = _run(data)
    for case in CASES:
        for key in ("value", "grad", "metrics"):
            for got, want in zip(jax.tree.leaves(dirty[case][key]),
                                 jax.tree.leaves(clean[case][key])):  # fmt: skip
                np.testing.assert_array_equal(got, want, err_msg=f"{case} {key}")


def test_no_token_and_bad_advantages_under_jit():
    """Under ``jit`` the values cannot be checked: a mask with no token gives a loss of 0,
    a zero gradient and metrics of 0; a NaN advantage on a counted token a NaN loss."""
    data = dict(_data(), mask=np.zeros((B, L), bool))
    for case, result in _run(data).items():
        assert result["value"] == 0, case
        assert not np.any(result["grad"]), case
        assert all(leaf == 0 for leaf in jax.tree.leaves(result["metrics"])), case
    data = _data()
    data["advantages"] = np.array([1.0, np.nan, 0.5, -1.3])
    assert np.isnan(_run(data)["grpo"]["value"])


SPLIT = 1  # rows [0, 1) and [1, 4): parts of different sizes
PARTS = {
    "token_mean": dict(normalization="token_mean", epsilon_high=0.28, **REF, **ENTROPY,
                       kl_coef=0.1, entropy_coef=0.01),
    "sequence_mean": dict(importance_level="sequence", epsilon_low=0.1, epsilon_high=0.15),
    "fixed_length": dict(normalization="fixed_length", max_length=8, objective="cispo"),
}  # fmt: skip


def test_parts_of_a_batch_sum_to_the_whole_batch():
    """Two parts of the batch (gradient accumulation), each given the whole batch's count
    (``num_tokens`` or ``num_sequences``): their losses and gradients sum to the whole
    batch's."""
    with jax.enable_x64(True):
        data = _data()

        def loss(log_probs, rows, normalization, count=None):
            pick = lambda x: x[rows]
            options = {k: pick(data[v]) if k in ("ref_log_probs", "entropy") else v
                       for k, v in PARTS[normalization].items()}  # fmt: skip
            name = "num_tokens" if normalization == "token_mean" else "num_sequences"
            options.update({name: count} if count is not None else {})
            return policy_gradient_loss(log_probs, pick(data["old"]), pick(data["advantages"]),
                                        mask=pick(data["mask"]), **options)[0]  # fmt: skip

        def every(log_probs):
            results = {}
            for normalization in PARTS:
                count = MASK.sum() if normalization == "token_mean" else B
                whole = jax.value_and_grad(lambda x: loss(x, slice(None), normalization))(log_probs)
                parts = [
                    jax.value_and_grad(lambda x: loss(x, rows, normalization, count))(
                        log_probs[rows]
                    )
                    for rows in (slice(0, SPLIT), slice(SPLIT, B))
                ]
                results[normalization] = whole, parts
            return results

        results = jax.jit(every)(data["log_probs"])
    for normalization, (whole, parts) in results.items():
        np.testing.assert_allclose(parts[0][0] + parts[1][0], whole[0], rtol=1e-13,
                                   err_msg=normalization)  # fmt: skip
        np.testing.assert_allclose(np.concatenate([parts[0][1], parts[1][1]]), whole[1],
                                   rtol=1e-13, atol=1e-16, err_msg=normalization)  # fmt: skip


def test_bfloat16_eager_equals_float32_under_jit():
    """bf16 inputs: a float32 loss and metrics, a bf16 gradient, the float32 computation of
    the same (rounded) values. Eagerly (one compiled program each for the value and the
    gradient) against ``jax.jit`` of the float32 call."""
    data = _data()
    rounded = {k: v.astype(jnp.bfloat16) for k, v in data.items() if k != "mask"}
    options = dict(mask=jax.device_put(MASK), normalization="token_mean", epsilon_high=0.28,
                   kl_coef=0.1, entropy_coef=0.01)  # fmt: skip
    bf16 = {k: jax.device_put(v) for k, v in rounded.items()}
    f32 = {k: v.astype(np.float32) for k, v in rounded.items()}

    def value_and_grad(x):
        loss = lambda lp: policy_gradient_loss(
            lp, x["old"], x["advantages"], ref_log_probs=x["ref"], entropy=x["entropy"], **options
        )
        return jax.value_and_grad(loss, has_aux=True)(x["log_probs"])

    (loss, metrics), grad = value_and_grad(bf16)
    (want, want_metrics), want_grad = jax.jit(value_and_grad)(f32)
    assert loss.dtype == metrics.ratio_mean.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics.kl_mean, want_metrics.kl_mean, rtol=1e-6)
    np.testing.assert_allclose(grad.astype(np.float32), want_grad.astype(jnp.bfloat16).astype(
        np.float32), rtol=1e-2, atol=1e-6)  # fmt: skip


def _error_call(**changes):
    """A valid call's arguments (NumPy, float32), with ``changes``."""
    data = _data()
    arguments = dict(log_probs=data["log_probs"].astype(np.float32),
                     old_log_probs=data["old"].astype(np.float32),
                     advantages=data["advantages"].astype(np.float32), mask=MASK)  # fmt: skip
    return dict(arguments, **changes)


F32 = np.zeros((B, L), np.float32)
ERRORS = [
    (dict(log_probs=F32.astype(np.int32)), TypeError, r"log_probs must be a floating-point.*int32"),
    (dict(log_probs=F32[0]), ValueError, r"log_probs must be \[B, L\].*\(6,\)"),
    (dict(old_log_probs=F32[:, :5]), ValueError, r"old_log_probs must have log_probs' shape \(4, 6\)"),
    (dict(ref_log_probs=F32.T), ValueError, r"ref_log_probs must have log_probs' shape"),
    (dict(entropy=F32[:3]), ValueError, r"entropy must have log_probs' shape .*\(3, 6\)"),
    (dict(mask=MASK.astype(np.int32)), TypeError, r"mask must be a boolean array .*int32"),
    (dict(mask=MASK[:, :4]), ValueError, r"mask must have log_probs' shape \(4, 6\).*\(4, 4\)"),
    (dict(advantages=np.zeros(6, np.float32)), ValueError, r"advantages must be \[B\] = \(4,\).*\(6,\)"),
    (dict(advantages=np.zeros(4, np.int32)), TypeError, r"advantages must be a floating-point"),
    (dict(objective="grpo"), ValueError, r"objective must be one of .*'grpo' is the defaults"),
    (dict(normalization="dapo"), ValueError, r"normalization must be one of .*normalization='token_mean'"),
    (dict(importance_level="seq"), ValueError, r"importance_level must be one of \('token', 'sequence'\); got 'seq'"),
    (dict(kl_estimator="low_var_kl"), ValueError, r"kl_estimator must be one of .*kl_estimator='k3'"),
    (dict(epsilon_low=-0.1), ValueError, r"epsilon_low must be >= 0.0 and <= 1.0; got -0.1"),
    (dict(epsilon_high=-0.2), ValueError, r"epsilon_high must be >= 0.0; got -0.2"),
    (dict(objective="cispo", epsilon_low=0.1), ValueError, r"epsilon_low=0.1 .*objective='ppo' only"),
    (dict(dual_clip=1.0), ValueError, r"dual_clip must be > 1.0; got 1.0"),
    (dict(dual_clip=3.0, objective="cispo"), ValueError, r"dual_clip=3.0 .*objective='ppo' only"),
    (dict(normalization="fixed_length"), ValueError, r"max_length is None"),
    (dict(normalization="fixed_length", max_length=5), ValueError, r"max_length must be at least .* L = 6.*got 5"),
    (dict(normalization="fixed_length", max_length=6.0), TypeError, r"max_length must be an int; got float"),
    (dict(max_length=8), ValueError, r"max_length=8 .*normalization='fixed_length' only"),
    (dict(kl_coef=0.1), ValueError, r"kl_coef=0.1 adds a term that reads ref_log_probs, but ref_log_probs is None"),
    (dict(entropy_coef=0.1), ValueError, r"entropy_coef=0.1 .* but entropy is None"),
    (dict(kl_coef=-0.1, ref_log_probs=F32), ValueError, r"kl_coef must be >= 0.0; got -0.1"),
    (dict(mask=np.zeros((B, L), bool)), ValueError, r"mask selects no token: all 24 entries are False"),
    (dict(advantages=np.array([1, np.nan, 0, 0], np.float32)), ValueError, r"advantages must be finite .*nan at position \(1,\)"),
    (dict(advantages=np.where(np.eye(B, L, dtype=bool), np.inf, 0).astype(np.float32)),
     ValueError, r"advantages must be finite .*inf at position \(0, 0\)"),
    (dict(num_tokens=25), ValueError, r"num_tokens applies to normalization='token_mean' only"),
    (dict(normalization="token_mean", num_sequences=4), ValueError, r"num_sequences applies to"),
    (dict(normalization="token_mean", num_tokens=10), ValueError, r"num_tokens counts .* at least 14 .*got 10"),
    (dict(num_sequences=3), ValueError, r"num_sequences counts the sequences .* at least 4 .*got 3.0"),
    (dict(normalization="token_mean", num_tokens=True), TypeError, r"num_tokens must be a number"),
    (dict(normalization="token_mean", num_tokens=np.ones(2)), TypeError, r"num_tokens must be a number or a 0-d array; got float64 array of shape \(2,\)"),
]  # fmt: skip


@pytest.mark.parametrize("changes, error, message", ERRORS)
def test_bad_arguments_raise_naming_them(changes, error, message):
    """Before any computation: the checks alone raise (and the public function too)."""
    call = _error_call(**changes)
    with pytest.raises(error, match=message):
        check_policy_call(call.pop("log_probs"), call.pop("old_log_probs"),
                          call.pop("advantages"), **call)  # fmt: skip
    call = _error_call(**changes)
    with pytest.raises(error, match=message):
        policy_gradient_loss(**call)


def test_values_off_the_mask_are_not_checked():
    """An advantage that is not finite where no token counts (a padded row of [B, L]
    advantages) is no error; a whole-batch count may be traced."""
    advantages = np.where(MASK, 1.0, np.nan).astype(np.float32)
    call = check_policy_call(*[_error_call()[k] for k in ("log_probs", "old_log_probs")],
                             advantages, mask=MASK)  # fmt: skip
    assert call.options.epsilon_high == 0.2 and call.num_tokens is None
    counted = jax.make_jaxpr(
        lambda n: (
            check_policy_call(**_error_call(normalization="token_mean", num_tokens=n)).num_tokens
        )
    )(np.float32(3.0))  # a traced count below this batch's 14 cannot be checked
    assert counted.out_avals[0].shape == ()


def test_rl_benchmark_script_checks_times_and_reports(tmp_path, monkeypatch):
    """experiments/benchmark_rl.py on a tiny shape: the fused GRPO step agrees with the two
    logits paths, the timed and memory rows carry every competitor and ratio, the table is
    written, and a wrong competitor is reported as disagreeing."""
    import importlib.util
    import pathlib
    import sys

    folder = pathlib.Path(__file__).resolve().parents[1] / "experiments"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("benchmark_rl", folder / "benchmark_rl.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shape = (2, 5, 8, 40)
    names = ("fused", "logits + ours", "logits + jax.nn")
    # The timing harness is tested in tests/test_benchmark.py; fixed seconds here.
    rounds = [dict(zip(names, (1.0, 2.0, 3.0))), dict(zip(names, (1.0, 4.0, 5.0)))]
    monkeypatch.setattr(script.harness, "time_rounds", lambda callables, repeats: rounds)
    timed = script.case_time(shape, jnp.float32, repeats=1)
    assert timed["agree"] and set(timed["seconds"]) == set(names)
    assert timed["fused / logits + ours"] == 1.0 / 3.0  # medians 1 and 3
    memory = script.case_memory(shape, jnp.float32)
    assert set(memory["temp_bytes"]) == set(names)
    meta = dict(device="cpu", jax="x", python="x", command="c")
    script.write_markdown(tmp_path / "results.md", meta, [memory, timed])
    assert "| (2, 5, 8, 40) | float32 | True |" in (tmp_path / "results.md").read_text()
    results = {n: (np.zeros(()), (np.ones((2,)),)) for n in ("a", "b")}  # NumPy: no programs
    results["b"] = (np.zeros(()), (2 * np.ones((2,)),))
    assert not script.harness.agree(results, jnp.float32)
    for sibling in ("harness", "common"):  # the helper modules it imported, not the suite's
        sys.modules.pop(sibling, None)

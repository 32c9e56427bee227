"""The preference losses: values, gradients and metrics against independent references.

References, written here from the definitions and never from the library's code:

* :func:`definitions`: float64 NumPy from the papers (DPO, conservative DPO, robust DPO,
  SLiC's hinge, IPO, SimPO, CPO, ORPO): the loss, the metrics, and the gradient with respect
  to the logits by the token rule: each token of a response gets ``d loss / d total`` times
  ``onehot - p``;
* :func:`naive`: ``jax.grad`` of the naive composition (``log_softmax`` of the full logits,
  gathered, multiplied by the mask, summed per response, the formulas written out);
* :func:`trl`: TRL's trainers' formulas, in NumPy as TRL writes them in PyTorch (read from
  huggingface/trl at f2cd577, 2026-07: ``DPOTrainer._compute_loss``, and its ``dpo_loss``
  before #3906 for conservative DPO and IPO's rewards; ``CPOTrainer.cpo_loss`` and
  ``concatenated_forward``; ``ORPOTrainer.odds_ratio_loss``).

Every case runs in one compiled program (:func:`_program`), reused for other masks (a pair
with one empty response and a batch of padding pairs, under ``jit``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sample

import jaxsoftmax
from jaxsoftmax import (
    PreferenceMetrics,
    SequenceLogProbs,
    linear_preference_loss,
    preference_loss,
    preference_pairs,
    sequence_log_probs,
    token_log_probs,
)

# Eight responses in TRL's concatenated layout ("halves"): rows 0-3 chosen, 4-7 rejected;
# pair 3 (rows 3 and 7) is padding, both empty. Prompts are the leading False positions.
R, L, V = 8, 5, 6
MASK = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0],
                 [0, 1, 1, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)  # fmt: skip
CASES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.5),
    "cdpo": dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.1),
    "robust": dict(loss_type="robust", beta=0.5, label_smoothing=0.2),
    "hinge": dict(loss_type="hinge", beta=0.4),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "rpo": dict(loss_type="sigmoid", beta=0.5, nll_coef=0.5),
    "simpo": dict(loss_type="simpo", beta=2.0, gamma=0.3, label_smoothing=0.1),
    "cpo": dict(loss_type="cpo", beta=0.5, label_smoothing=0.05),
    "orpo": dict(loss_type="orpo", beta=0.25),
}
TYPES_WITH_REFERENCE = ("sigmoid", "robust", "hinge", "ipo")
# The tests that share a compiled program run on one test worker, which compiles it once.
EVERY_CASE = pytest.mark.xdist_group("preference_every_case")
FUSED = pytest.mark.xdist_group("preference_fused")
MEANS = ("ipo", "simpo", "orpo")


def _data():
    keys = sample.split(1, 3)
    return dict(
        z=sample.numpy_normal(keys[0], (R, L, V), np.float64, scale=2.0),
        z_ref=sample.numpy_normal(keys[1], (R, L, V), np.float64, scale=2.0),
        tokens=sample.numpy_integers(keys[2], (R, L), 0, V),
        mask=MASK,
    )


def _options(case):
    options = dict(CASES[case])
    return options, options["loss_type"] in TYPES_WITH_REFERENCE


# --- references --------------------------------------------------------------------------


def _np_log_probs(z, tokens):
    """``(log p of each token [R, L], p [R, L, V])`` in float64."""
    x = z - z.max(-1, keepdims=True)
    log_softmax = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return np.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0], np.exp(log_softmax)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def definitions(z, z_ref, tokens, mask, *, loss_type, beta, label_smoothing=0.0, gamma=0.5,
                nll_coef=None):  # fmt: skip
    """Float64 NumPy from the definitions: ``(loss, d loss / d z, metrics as a dict)``."""
    eps = label_smoothing
    nll_coef = (1.0 if loss_type in ("orpo", "cpo") else 0.0) if nll_coef is None else nll_coef
    log_p, p = _np_log_probs(z, tokens)
    total, count = np.where(mask, log_p, 0.0).sum(1), mask.sum(1)
    ref_total = np.where(mask, _np_log_probs(z_ref, tokens)[0], 0.0).sum(1)
    half = R // 2
    counted = (count[:half] > 0) & (count[half:] > 0)
    scale = np.where(count > 0, 1.0 / np.maximum(count, 1), 0.0) if loss_type in MEANS else 1.0
    pi, ref = total * scale, ref_total * scale  # what the type reads: sums or means
    pc, pr = pi[:half][counted], pi[half:][counted]
    # Each pair's term l and its derivatives a_c, a_r with respect to pi_c, pi_r.
    if loss_type in TYPES_WITH_REFERENCE:
        chosen_ratio, rejected_ratio = pc - ref[:half][counted], pr - ref[half:][counted]
        u = chosen_ratio - rejected_ratio
        x = beta * u
        if loss_type == "sigmoid":
            terms = -(1 - eps) * _log_sigmoid(x) - eps * _log_sigmoid(-x)
            du = beta * (_sigmoid(x) - (1 - eps))
        elif loss_type == "robust":
            terms = (-(1 - eps) * _log_sigmoid(x) + eps * _log_sigmoid(-x)) / (1 - 2 * eps)
            du = beta * (-(1 - eps) * _sigmoid(-x) - eps * _sigmoid(x)) / (1 - 2 * eps)
        elif loss_type == "hinge":
            terms, du = np.maximum(1 - x, 0.0), np.where(x < 1, -beta, 0.0)
        else:
            terms, du = (u - 1 / (2 * beta)) ** 2, 2 * (u - 1 / (2 * beta))
        a_c, a_r = du, -du
        rewards = beta * chosen_ratio, beta * rejected_ratio
    else:
        log_odds = None
        if loss_type == "orpo":
            log_odds = (pc - pr) - (np.log1p(-np.exp(pc)) - np.log1p(-np.exp(pr)))
            terms = -beta * _log_sigmoid(log_odds)
            d = -beta * _sigmoid(-log_odds)
            a_c, a_r = d / (1 - np.exp(pc)), -d / (1 - np.exp(pr))
        else:
            x = beta * (pc - pr) - (gamma if loss_type == "simpo" else 0.0)
            terms = -(1 - eps) * _log_sigmoid(x) - eps * _log_sigmoid(-x)
            a_c = beta * (_sigmoid(x) - (1 - eps))
            a_r = -a_c
        rewards = beta * pc, beta * pr
    pairs = counted.sum()
    g_read = np.zeros(R)
    g_read[:half][counted], g_read[half:][counted] = a_c / pairs, a_r / pairs
    g_total = g_read * scale
    loss = terms.sum() / pairs
    chosen_tokens = count[:half][counted].sum()
    nll = -total[:half][counted].sum() / chosen_tokens
    if nll_coef:
        loss += nll_coef * nll
        g_total[:half][counted] -= nll_coef / chosen_tokens
    onehot = np.eye(V)[tokens]
    grad = np.where(mask[..., None], g_total[:, None, None] * (onehot - p), 0.0)
    metrics = dict(
        chosen_reward=rewards[0].mean(), rejected_reward=rewards[1].mean(),
        reward_margin=(rewards[0] - rewards[1]).mean(),
        reward_accuracy=(rewards[0] > rewards[1]).mean(), chosen_log_prob=pc.mean(),
        rejected_log_prob=pr.mean(), pair_count=pairs,
        log_odds_ratio=log_odds.mean() if loss_type == "orpo" else None,
        nll=nll if nll_coef or loss_type in ("orpo", "cpo") else None,
    )  # fmt: skip
    return loss, grad, metrics


def trl(z, z_ref, tokens, mask, *, loss_type, beta, label_smoothing=0.0, gamma=0.5,
        nll_coef=None):  # fmt: skip
    """TRL's formulas on its concatenated batch (no padding pairs: the counted rows only):
    ``(loss, {metric: value})`` with TRL's metric names."""
    keep = np.concatenate([MASK[: R // 2].any(1) & MASK[R // 2 :].any(1)] * 2)
    z, z_ref, tokens, mask = z[keep], z_ref[keep], tokens[keep], mask[keep]
    half = len(z) // 2
    per_token_logps = np.where(mask, _np_log_probs(z, tokens)[0], 0.0)  # [mask == 0] = 0.0
    ref_per_token_logps = np.where(mask, _np_log_probs(z_ref, tokens)[0], 0.0)
    completion_lengths = np.maximum(mask.sum(1), 1.0)  # .clamp(min=1.0)
    # The chosen responses' cross-entropy, nn.CrossEntropyLoss over their completion tokens
    # (CPOTrainer's nll_loss, DPOTrainer's "sft" loss type, which replaced rpo_alpha).
    nll_loss = -per_token_logps[:half].sum() / mask[:half].sum()
    if loss_type in TYPES_WITH_REFERENCE:  # DPOTrainer._compute_loss
        logps = per_token_logps.sum(1)
        ref_logps = ref_per_token_logps.sum(1)
        chosen_logps, rejected_logps = logps[:half], logps[half:]
        chosen_logratios = chosen_logps - ref_logps[:half]
        rejected_logratios = rejected_logps - ref_logps[half:]
        delta_score = chosen_logratios - rejected_logratios
        if loss_type == "sigmoid":
            # dpo_loss before #3906 (cDPO); since then TRL's sigmoid drops label_smoothing.
            per_sequence_loss = (
                -_log_sigmoid(beta * delta_score) * (1 - label_smoothing)
                - _log_sigmoid(-beta * delta_score) * label_smoothing
            )
        elif loss_type == "hinge":
            per_sequence_loss = np.maximum(1 - beta * delta_score, 0.0)
        elif loss_type == "ipo":
            chosen_avg_score = chosen_logratios / completion_lengths[:half]
            rejected_avg_score = rejected_logratios / completion_lengths[half:]
            ipo_delta = chosen_avg_score - rejected_avg_score
            per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
            # Rewards: TRL < #3906 averaged the log-probs for IPO before everything
            # (concatenated_forward: all_logps / loss_mask.sum(-1)); TRL now logs the sums'.
            chosen_logratios, rejected_logratios = chosen_avg_score, rejected_avg_score
            chosen_logps = chosen_logps / completion_lengths[:half]
            rejected_logps = rejected_logps / completion_lengths[half:]
        else:
            clean_loss_term = -(1 - label_smoothing) * _log_sigmoid(beta * delta_score)
            flipped_loss_term = -label_smoothing * _log_sigmoid(-beta * delta_score)
            per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
        loss = per_sequence_loss.mean() + (nll_coef or 0.0) * nll_loss  # loss_weights
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        metrics = {}
    elif loss_type in ("cpo", "simpo"):  # CPOTrainer (cpo_alpha = nll_coef)
        all_logps = per_token_logps.sum(-1)
        if loss_type == "simpo":  # average_log_prob=self.loss_type in ["ipo", "simpo"]
            all_logps = all_logps / mask.sum(-1)
        chosen_logps, rejected_logps = all_logps[:half], all_logps[half:]
        logits = chosen_logps - rejected_logps
        if loss_type == "simpo":
            logits = logits - gamma / beta
        losses = (
            -_log_sigmoid(beta * logits) * (1 - label_smoothing)
            - _log_sigmoid(-beta * logits) * label_smoothing
        )
        cpo_alpha = (1.0 if loss_type == "cpo" else 0.0) if nll_coef is None else nll_coef
        loss = losses.mean() + cpo_alpha * nll_loss
        chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
        metrics = {"nll_loss": nll_loss}
    else:  # ORPOTrainer.odds_ratio_loss; its NLL here over the completion (see the module)
        all_logps = per_token_logps.sum(-1) / mask.sum(-1)
        chosen_logps, rejected_logps = all_logps[:half], all_logps[half:]

        def log1mexp(x):
            return np.where(x < -0.6931471805599453, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))

        log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) -
                                                      log1mexp(rejected_logps))  # fmt: skip
        ratio = _log_sigmoid(log_odds)
        losses = beta * ratio
        loss = nll_loss - losses.mean()
        chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
        metrics = {"nll_loss": nll_loss, "log_odds_chosen": log_odds.mean()}
    metrics.update({
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean(),
    })  # fmt: skip
    return loss, metrics


TRL_NAMES = {"chosen_reward": "rewards/chosen", "rejected_reward": "rewards/rejected",
             "reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins",
             "chosen_log_prob": "logps/chosen", "rejected_log_prob": "logps/rejected",
             "nll": "nll_loss", "log_odds_ratio": "log_odds_chosen"}  # fmt: skip


def naive(z, z_ref, tokens, mask, *, loss_type, beta, label_smoothing=0.0, gamma=0.5,
          nll_coef=None):  # fmt: skip
    """The loss from the full logits, as a trainer writes it, for ``jax.grad``."""
    eps = label_smoothing
    nll_coef = (1.0 if loss_type in ("orpo", "cpo") else 0.0) if nll_coef is None else nll_coef
    m = mask.astype(z.dtype)
    gathered = lambda z: jnp.take_along_axis(jax.nn.log_softmax(z), tokens[..., None], -1)[..., 0]
    totals, counts = jnp.sum(gathered(z) * m, 1), jnp.sum(m, 1)
    ref_totals = jax.lax.stop_gradient(jnp.sum(gathered(z_ref) * m, 1))
    if loss_type in MEANS:
        totals, ref_totals = totals / jnp.maximum(counts, 1), ref_totals / jnp.maximum(counts, 1)
    half = R // 2
    counted = (counts[:half] > 0) & (counts[half:] > 0)
    pc = jnp.where(counted, totals[:half], -1.0)  # padding pairs: a harmless -1
    pr = jnp.where(counted, totals[half:], -1.0)
    logistic = lambda x: -(1 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)
    if loss_type in TYPES_WITH_REFERENCE:
        u = (pc - ref_totals[:half]) - (pr - ref_totals[half:])
        terms = {
            "sigmoid": lambda: logistic(beta * u),
            "robust": lambda: (-(1 - eps) * jax.nn.log_sigmoid(beta * u)
                               + eps * jax.nn.log_sigmoid(-beta * u)) / (1 - 2 * eps),
            "hinge": lambda: jnp.maximum(1 - beta * u, 0.0),
            "ipo": lambda: (u - 1 / (2 * beta)) ** 2,
        }[loss_type]()  # fmt: skip
    elif loss_type == "orpo":
        odds = lambda m: m - jnp.log1p(-jnp.exp(m))
        terms = -beta * jax.nn.log_sigmoid(odds(pc) - odds(pr))
    else:
        terms = logistic(beta * (pc - pr) - (gamma if loss_type == "simpo" else 0.0))
    pairs = jnp.maximum(jnp.sum(counted, dtype=z.dtype), 1)
    loss = jnp.sum(jnp.where(counted, terms, 0.0)) / pairs
    if nll_coef:
        chosen_mask = jnp.where(counted[:, None], m[:half], 0.0)
        nll = -jnp.sum(gathered(z)[:half] * chosen_mask) / jnp.maximum(jnp.sum(chosen_mask), 1)
        loss = loss + nll_coef * nll
    return loss


def ours(z, z_ref, tokens, mask, **options):
    """The public functions, composed from the logits."""
    reference = options["loss_type"] in TYPES_WITH_REFERENCE

    def pairs(z):
        log_p = token_log_probs(z, tokens, where=mask)
        return preference_pairs(sequence_log_probs(log_p, mask=mask), "halves")

    chosen, rejected = pairs(z)
    references = dict(zip(("reference_chosen", "reference_rejected"), pairs(z_ref)))
    return preference_loss(chosen, rejected, **(references if reference else {}), **options)


@functools.cache
def _program():
    """Every case in one jitted function of the inputs: ours (value, metrics, gradient) and
    the naive composition's value and gradient."""

    def every(data):
        results = {}
        arrays = (data["z_ref"], data["tokens"], data["mask"])
        for case, options in CASES.items():
            (value, metrics), grad = jax.value_and_grad(
                lambda z: ours(z, *arrays, **options), has_aux=True
            )(data["z"])
            naive_value, naive_grad = jax.value_and_grad(lambda z: naive(z, *arrays, **options))(
                data["z"]
            )
            results[case] = dict(value=value, metrics=metrics, grad=grad, naive=naive_value,
                                 naive_grad=naive_grad)  # fmt: skip
        return results

    return jax.jit(every)


def _run(data):
    with jax.enable_x64(True):
        return jax.device_get(_program()(data))


@functools.cache
def _results():
    return _run(_data())


@EVERY_CASE
@pytest.mark.parametrize("case", CASES)
def test_value_gradient_and_metrics_equal_the_definitions(case):
    """float64: value, metrics and gradient (by the token rule) against NumPy from the
    definitions, and against the value and ``jax.grad`` of the naive composition."""
    data, result = _data(), _results()[case]
    loss, grad, metrics = definitions(**data, **CASES[case])
    assert result["value"].dtype == np.float64 and result["grad"].dtype == np.float64
    np.testing.assert_allclose(result["value"], loss, rtol=1e-12)
    np.testing.assert_allclose(result["naive"], loss, rtol=1e-12)
    np.testing.assert_allclose(result["grad"], grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(result["naive_grad"], grad, rtol=1e-10, atol=1e-14)
    assert isinstance(result["metrics"], PreferenceMetrics)
    for name, expected in metrics.items():
        got = getattr(result["metrics"], name)
        if expected is None:
            assert got is None, name
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15, err_msg=name)
    assert result["metrics"].pair_count.dtype == np.int32


@EVERY_CASE
@pytest.mark.parametrize("case", CASES)
def test_value_and_metrics_equal_trls_formulas(case):
    """The same inputs through TRL's formulas: the loss and every metric TRL logs."""
    loss, metrics = trl(**_data(), **CASES[case])
    result = _results()[case]
    np.testing.assert_allclose(result["value"], loss, rtol=1e-12)
    for name, trl_name in TRL_NAMES.items():
        got = getattr(result["metrics"], name)
        if trl_name in metrics and got is not None:  # TRL's SimPO logs its unused NLL too
            np.testing.assert_allclose(got, metrics[trl_name], rtol=1e-12, err_msg=name)


@EVERY_CASE
def test_the_data_reach_every_branch():
    """Some pairs are ranked right and some wrong, and the hinge is active for some pairs
    only, so that the comparisons above test each branch; the padding pair is not counted."""
    results = _results()
    for case in CASES:
        assert 0 < results[case]["metrics"].reward_accuracy < 1, case
        assert results[case]["metrics"].pair_count == 3
    data = _data()
    log_p = np.where(MASK, _np_log_probs(data["z"], data["tokens"])[0], 0).sum(1)
    ref = np.where(MASK, _np_log_probs(data["z_ref"], data["tokens"])[0], 0).sum(1)
    u = (log_p - ref)[:3] - (log_p - ref)[4:7]
    assert np.any(0.4 * u < 1) and np.any(0.4 * u > 1)


@EVERY_CASE
def test_label_smoothing_interpolates_towards_the_flipped_labels():
    """cDPO's loss is ``(1 - eps)`` DPO's plus ``eps`` the flipped pairs' (by linearity of
    the formula), and robust DPO at ``eps = 0`` is DPO."""
    results = _results()
    dpo = results["sigmoid"]["value"]
    data = _data()
    flipped = dict(data, z=data["z"][np.r_[4:8, 0:4]], z_ref=data["z_ref"][np.r_[4:8, 0:4]],
                   tokens=data["tokens"][np.r_[4:8, 0:4]], mask=MASK[np.r_[4:8, 0:4]])  # fmt: skip
    flipped_loss = definitions(**flipped, **CASES["sigmoid"])[0]
    np.testing.assert_allclose(results["cdpo"]["value"], 0.9 * dpo + 0.1 * flipped_loss,
                               rtol=1e-12)  # fmt: skip
    robust = definitions(**data, loss_type="robust", beta=0.5, label_smoothing=0.0)[0]
    np.testing.assert_allclose(robust, dpo, rtol=1e-12)


@EVERY_CASE
def test_under_jit_an_empty_response_drops_its_pair_and_no_pair_gives_zero():
    """Values a ``jit`` cannot check: a pair with one empty response is not counted (the
    same as that pair made padding), and a batch of padding pairs gives a loss of 0, a zero
    gradient and metrics of 0. The same program as above."""
    one_empty = MASK.copy()
    one_empty[5] = False  # pair 1's rejected response
    both_empty = one_empty.copy()
    both_empty[1] = False
    lone, padding = _run(dict(_data(), mask=one_empty)), _run(dict(_data(), mask=both_empty))
    for case in CASES:
        np.testing.assert_allclose(lone[case]["value"], padding[case]["value"], rtol=1e-12)
        assert padding[case]["metrics"].pair_count == 2
    empty = _run(dict(_data(), mask=np.zeros((R, L), bool)))
    for case, result in empty.items():
        assert result["value"] == 0 and not np.any(result["grad"]), case
        assert all(leaf == 0 for leaf in jax.tree.leaves(result["metrics"])), case


def test_a_part_of_a_batch_may_hold_no_pair():
    """Given the whole batch's ``num_pairs``, a part of padding pairs is no error: its loss
    is 0 (and so is its NLL's share)."""
    loss, metrics = preference_loss(EMPTY, EMPTY, loss_type="cpo", num_pairs=3,
                                    num_chosen_tokens=9)  # fmt: skip
    assert loss == 0 and metrics.pair_count == 0 and metrics.nll == 0


# --- sequences: packed and unpacked, both layouts ----------------------------------------

# Eight responses of up to 4 tokens: unpacked one per row, or packed four to a row of 11
# positions with segment ids (0: a prompt's or padding position). Flattened row-major, the
# packed segments are the unpacked rows in order, so both pair alike in either layout.
UNPACKED = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0],
                     [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], bool)  # fmt: skip
SEGMENTS = np.array([[1, 1, 1, 2, 2, 3, 4, 4, 4, 4, 0],
                     [0, 1, 1, 2, 2, 2, 3, 0, 4, 4, 0]], np.int32)  # fmt: skip


def _packed(x):
    """The unpacked ``[8, 4]`` tokens' values at their packed ``[2, 11]`` positions, NaN
    elsewhere."""
    packed = np.full(SEGMENTS.shape, np.nan)
    for response in range(8):
        row, segment = divmod(response, 4)
        packed[row, SEGMENTS[row] == segment + 1] = x[response][UNPACKED[response]]
    return packed


def test_packed_sequences_equal_unpacked_in_both_layouts():
    """The same eight responses' tokens, one per row under a mask (``-inf`` off it) or packed
    with segment ids (NaN elsewhere): equal sums and counts, and the same loss and gradient
    in both layouts."""
    keys = sample.split(2, 2)
    log_p = -np.abs(sample.numpy_normal(keys[0], (8, 4), np.float64))
    ref = -np.abs(sample.numpy_normal(keys[1], (8, 4), np.float64))
    unpacked = lambda x: np.where(UNPACKED, x, -np.inf)

    @jax.jit
    def run(log_p, ref, packed_log_p, packed_ref):
        sums = {
            False: lambda v: sequence_log_probs(v, mask=UNPACKED),
            True: lambda v: sequence_log_probs(v, segment_ids=SEGMENTS, num_segments=4),
        }
        results = {}
        for layout in ("interleaved", "halves"):

            def loss(x, packed):
                pairs = lambda v: preference_pairs(sums[packed](v), layout)
                chosen, rejected = pairs(x)
                ref_chosen, ref_rejected = pairs(packed_ref if packed else ref)
                return preference_loss(chosen, rejected, reference_chosen=ref_chosen,
                                       reference_rejected=ref_rejected, loss_type="ipo")[0]  # fmt: skip

            results[layout] = (
                jax.value_and_grad(lambda x: loss(x, False))(log_p),
                jax.value_and_grad(lambda x: loss(x, True))(packed_log_p),
            )
        return results, (sums[False](log_p), sums[True](packed_log_p))

    with jax.enable_x64(True):
        results, (flat, packed) = run(unpacked(log_p), unpacked(ref), _packed(log_p), _packed(ref))
    np.testing.assert_allclose(np.asarray(packed.total).reshape(-1), flat.total, rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(packed.count).reshape(-1), UNPACKED.sum(1))
    assert packed.total.shape == (2, 4) and flat.total.shape == (8,)
    for layout, ((value, grad), (packed_value, packed_grad)) in results.items():
        np.testing.assert_allclose(packed_value, value, rtol=1e-13, err_msg=layout)
        np.testing.assert_allclose(np.asarray(packed_grad)[SEGMENTS > 0],
                                   _packed(np.asarray(grad))[SEGMENTS > 0], rtol=1e-13,
                                   err_msg=layout)  # fmt: skip
        assert np.all(np.asarray(grad)[~UNPACKED] == 0)
        assert np.all(np.asarray(packed_grad)[SEGMENTS == 0] == 0)
    interleaved, halves = results["interleaved"][0][0], results["halves"][0][0]
    assert interleaved != halves  # the layouts pair differently


def test_layouts_pair_the_flattened_responses():
    """Interleaved: (0, 1), (2, 3), ...; halves: (0, P), (1, P + 1), ...; packed rows
    flatten row-major."""
    sequences = SequenceLogProbs(np.arange(8.0).reshape(2, 4), np.ones((2, 4), np.int32))
    chosen, rejected = preference_pairs(sequences)
    np.testing.assert_array_equal(chosen.total, [0, 2, 4, 6])
    np.testing.assert_array_equal(rejected.total, [1, 3, 5, 7])
    chosen, rejected = preference_pairs(sequences, "halves")
    np.testing.assert_array_equal(chosen.total, [0, 1, 2, 3])
    np.testing.assert_array_equal(rejected.total, [4, 5, 6, 7])
    assert chosen.count.dtype == jnp.int32
    np.testing.assert_allclose(SequenceLogProbs(jnp.array([-3.0, 0.0]), jnp.array([2, 0])).mean,
                               [-1.5, 0.0])  # fmt: skip


# --- a batch in parts, dtypes ------------------------------------------------------------


def test_parts_of_a_batch_sum_to_the_whole_batch():
    """Gradient accumulation: two parts (pairs 0-1 and 2-3, one of them padding), each given
    the whole batch's ``num_pairs`` and ``num_chosen_tokens``: their losses and gradients sum
    to the whole batch's (DPO with the chosen responses' NLL: both counts)."""
    keys = sample.split(3, 2)
    log_p = -np.abs(sample.numpy_normal(keys[0], (R, L), np.float64))
    ref = -np.abs(sample.numpy_normal(keys[1], (R, L), np.float64))
    counts = MASK.sum(1)
    whole_pairs, whole_chosen = 3, counts[:3].sum()

    def loss(x, pairs, case, **whole):
        make = lambda v, rows: sequence_log_probs(v[np.array(rows)], mask=MASK[rows])
        chosen, rejected = make(x, pairs), make(x, [p + R // 2 for p in pairs])
        options, reference = _options(case)
        if reference:
            options.update(reference_chosen=make(ref, pairs),
                           reference_rejected=make(ref, [p + R // 2 for p in pairs]))  # fmt: skip
        return preference_loss(chosen, rejected, **options, **whole)[0]

    @jax.jit
    def run(x):
        results = {}
        for case in ("rpo",):
            whole = jax.value_and_grad(lambda x: loss(x, [0, 1, 2, 3], case))(x)
            counts = dict(num_pairs=whole_pairs, num_chosen_tokens=whole_chosen)
            parts = [jax.value_and_grad(lambda x: loss(x, pairs, case, **counts))(x)
                     for pairs in ([0, 1], [2, 3])]  # fmt: skip
            results[case] = whole, parts
        return results

    with jax.enable_x64(True):
        results = run(log_p)
    for case, (whole, parts) in results.items():
        np.testing.assert_allclose(parts[0][0] + parts[1][0], whole[0], rtol=1e-13, err_msg=case)
        np.testing.assert_allclose(parts[0][1] + parts[1][1], whole[1], rtol=1e-13, atol=1e-16,
                                   err_msg=case)  # fmt: skip


def test_bfloat16_inputs_give_float32():
    """bf16 token log-probabilities are summed in float32, and the loss and metrics are
    float32, equal to the float32 computation of the same rounded values; the gradient is
    bf16."""
    data = _data()
    log_p = np.where(MASK, _np_log_probs(data["z"], data["tokens"])[0], 0.0)
    rounded = jnp.asarray(log_p, jnp.bfloat16)

    def loss(x):
        chosen, rejected = preference_pairs(sequence_log_probs(x, mask=MASK), "halves")
        return preference_loss(chosen, rejected, loss_type="simpo", beta=2.0)

    both = jax.jit(lambda x: [jax.value_and_grad(loss, has_aux=True)(y)
                              for y in (x, x.astype(jnp.float32))])  # fmt: skip
    ((value, metrics), grad), ((want, _), want_grad) = both(rounded)
    assert value.dtype == metrics.reward_margin.dtype == jnp.float32
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad.astype(np.float32), want_grad, rtol=1e-2, atol=1e-6)
    assert sequence_log_probs(rounded, mask=MASK).total.dtype == jnp.float32


# --- fused -------------------------------------------------------------------------------

# A moderate shape: 256 tokens, V = 4096, so that the logits [N, V] (4 MiB in float32)
# dwarf the fused program's tiles of 32 x 256 and its [V, d] classifier gradients.
FB, FL, FD, FV = 8, 32, 8, 4096
TILES = dict(token_chunk=32, vocab_chunk=256)


@functools.cache
def _fused_inputs():
    keys = sample.split(4, 8)
    normal = lambda k, shape, scale=1.0: sample.numpy_normal(keys[k], shape, scale=scale)
    mask = np.ones((FB, FL), bool)
    mask[:, :5] = False  # the prompt
    mask[1, 20:] = False  # padding
    segments = np.where(mask, 1, 0).astype(np.int32)
    segments[:, 18:] *= 2  # two responses in each row
    return dict(
        hidden=normal(0, (FB, FL, FD)), classifier=normal(1, (FV, FD), 0.5),
        bias=normal(2, (FV,)), reference_hidden=normal(3, (FB, FL, 4)),
        reference_classifier=normal(4, (FV, 4), 0.5), reference_bias=normal(5, (FV,)),
        tokens=sample.numpy_integers(keys[6], (FB, FL), 0, FV), mask=mask, segments=segments,
    )  # fmt: skip


FUSED_CASES = {
    # A reference model, a bias, a temperature, the interleaved rows.
    "reference_model": dict(mask="mask", loss_type="sigmoid", beta=0.3, temperature=0.7,
                            label_smoothing=0.1),
    # Precomputed reference sequences, packed rows in the halves layout, "dv" classifier.
    "precomputed": dict(segment_ids="segments", num_segments=2, layout="halves",
                        loss_type="ipo", beta=0.5, classifier_layout="dv"),
}  # fmt: skip


def _fused_arguments(case, x):
    options = dict(FUSED_CASES[case])
    for name in ("mask", "segment_ids"):
        if name in options:
            options[name] = x[options[name]]
    return options


def _logits_path(case, x, h, c, b, references):
    """The composition from both models' logits."""
    options = _fused_arguments(case, x)
    temperature = options.pop("temperature", 1.0)
    layout = options.pop("layout", "interleaved")
    dv = options.pop("classifier_layout", "vd") == "dv"
    positions = {k: options.pop(k) for k in ("mask", "segment_ids", "num_segments")
                 if k in options}  # fmt: skip
    where = positions["mask"] if "mask" in positions else positions["segment_ids"] > 0

    def pairs(h, c, b):
        z = h @ (c if dv else c.T) + b[None, None, :]
        log_p = token_log_probs(z, x["tokens"], temperature=temperature, where=where)
        return preference_pairs(sequence_log_probs(log_p, **positions), layout)

    chosen, rejected = pairs(h, c, b)
    if options["loss_type"] in TYPES_WITH_REFERENCE:
        h_ref, c_ref, b_ref = references
        ref = pairs(h_ref, c_ref.T if dv else c_ref, b_ref)
        options.update(reference_chosen=ref[0], reference_rejected=ref[1])
    return preference_loss(chosen, rejected, **options)


@functools.cache
def _fused_programs():
    """The fused steps (value and gradients of the policy's and the reference's arrays) of
    every case in one compiled program; the logits paths' in another."""
    x = _fused_inputs()

    def fused(h, c, b, h_ref, c_ref, b_ref, references):
        results = {}
        for case in FUSED_CASES:
            options = _fused_arguments(case, x)
            dv = options.get("classifier_layout") == "dv"
            if case == "precomputed":
                options["reference_log_probs"] = references

            def loss(h, c, b, h_ref, c_ref, b_ref):
                model = dict(reference=(h_ref, c_ref, b_ref)) if case == "reference_model" else {}
                return linear_preference_loss(h, c.T if dv else c, x["tokens"], bias=b,
                                              **options, **model, **TILES)  # fmt: skip

            results[case] = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)(
                h, c, b, h_ref, c_ref, b_ref
            )
        return results

    def logits(h, c, b, h_ref, c_ref, b_ref):
        results = {}
        for case in FUSED_CASES:
            dv = FUSED_CASES[case].get("classifier_layout") == "dv"
            loss = lambda h, c, b: _logits_path(case, x, h, c.T if dv else c, b,
                                                (h_ref, c_ref, b_ref))  # fmt: skip
            results[case] = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(h, c, b)
        return results

    arguments = [x[k] for k in ("hidden", "classifier", "bias", "reference_hidden",
                                "reference_classifier", "reference_bias")]  # fmt: skip
    want = jax.jit(logits)(*arguments)
    compiled = jax.jit(fused).lower(*arguments, _reference_sequences()).compile()
    return compiled, compiled(*arguments, _reference_sequences()), want


def _reference_sequences():
    """The precomputed case's reference: the reference model's sequences in float64 NumPy,
    from its logits, in float32."""
    x = _fused_inputs()
    z = np.float64(x["reference_hidden"]) @ np.float64(x["reference_classifier"]).T
    log_p = np.where(x["segments"] > 0, _np_log_probs(z + x["reference_bias"], x["tokens"])[0], 0)
    member = x["segments"][:, :, None] == np.arange(1, 3)
    total = (log_p[:, :, None] * member).sum(1).reshape(-1).astype(np.float32)
    count = member.sum(1).reshape(-1).astype(np.int32)
    half = total.size // 2
    return (SequenceLogProbs(total[:half], count[:half]),
            SequenceLogProbs(total[half:], count[half:]))  # fmt: skip


@FUSED
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_equals_the_logits_path(case):
    """The fused loss, its metrics and its gradients (hidden, classifier, bias) equal the
    composition from the logits; the reference model's arrays get a zero gradient."""
    _, results, want = _fused_programs()
    (loss, metrics), grads = results[case]
    (want_loss, want_metrics), want_grads = want[case]
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
    for got, expected in zip(jax.tree.leaves(metrics), jax.tree.leaves(want_metrics)):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
    for got, expected, name in zip(grads[:3], want_grads, ("hidden", "classifier", "bias")):
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    for got in grads[3:]:
        assert not np.any(got)  # the reference's arrays: no gradient


@FUSED
def test_the_compiled_fused_step_holds_no_logits():
    """The fused steps' compiled temporary memory (two losses, one with a reference model,
    and their gradients) is far below one ``[N, V]`` float32 array."""
    compiled, _, _ = _fused_programs()
    logits_bytes = FB * FL * FV * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < logits_bytes / 8, (temp, logits_bytes)


@FUSED
def test_the_reference_model_costs_its_forward_only():
    """The step with a reference model holds the matrix products of the policy's forward and
    backward and of the reference's forward only: as many as the step with precomputed
    reference sequences plus the reference's token log-probabilities alone."""
    keys = sample.split(5, 3)
    h, w = sample.numpy_normal(keys[0], (4, 3, 6)), sample.numpy_normal(keys[1], (10, 6))
    tokens, mask = sample.numpy_integers(keys[2], (4, 3), 0, 10), np.ones((4, 3), bool)
    tiles = dict(token_chunk=4, vocab_chunk=4)
    pair = (SequenceLogProbs(np.zeros(2, np.float32), np.full(2, 3, np.int32)),) * 2

    def products(f):
        return jax.jit(f).lower(h, w, h, w).as_text().count("dot_general")

    def step(model):
        def loss(h, w, h_ref, w_ref):
            reference = dict(reference=(h_ref, w_ref)) if model else dict(reference_log_probs=pair)
            return linear_preference_loss(h, w, tokens, mask=mask, **reference, **tiles)[0]

        return jax.grad(loss, argnums=(0, 1, 2, 3))  # the reference too: zeros

    reference_alone = lambda h, w, h_ref, w_ref: jaxsoftmax.linear_token_log_probs(
        h_ref, w_ref, tokens, where=mask, **tiles
    )
    with_model = products(step(model=True))
    assert with_model == products(step(model=False)) + products(reference_alone)


# --- errors ------------------------------------------------------------------------------

F32 = np.float32
S2 = SequenceLogProbs(np.array([-1.0, -2.0], F32), np.array([2, 3], np.int32))
S3 = SequenceLogProbs(np.array([-1.0, -2.0, -3.0], F32), np.array([2, 3, 1], np.int32))
ONE_EMPTY = SequenceLogProbs(np.array([-1.0, 0.0], F32), np.array([2, 0], np.int32))
EMPTY = SequenceLogProbs(np.zeros(2, F32), np.zeros(2, np.int32))
OTHER_COUNTS = SequenceLogProbs(np.array([-1.0, -2.0], F32), np.array([2, 4], np.int32))
REF = dict(reference_chosen=S2, reference_rejected=S2)
PREFERENCE_ERRORS = [
    (dict(rejected=S3), ValueError, r"rejected must have chosen's shape \(2,\).*\(3,\)"),
    (dict(rejected=(S2.total, S2.count)), TypeError, r"rejected must be a SequenceLogProbs .*got tuple"),
    (dict(chosen=SequenceLogProbs(S2.count, S2.count)), TypeError, r"chosen.total must be a floating-point array; got int32"),
    (dict(chosen=SequenceLogProbs(S2.total, S2.total)), TypeError, r"chosen.count must be an integer array"),
    (dict(rejected=ONE_EMPTY, loss_type="cpo"), ValueError, r"pair \(1,\) has an empty rejected response"),
    (dict(chosen=EMPTY, rejected=EMPTY, loss_type="cpo"), ValueError, r"no pair has tokens: all 2 pairs are empty"),
    (dict(REF, reference_chosen=S3), ValueError, r"reference_chosen must have chosen's shape \(2,\)"),
    (dict(REF, reference_rejected=OTHER_COUNTS), ValueError, r"reference_rejected.count differs from rejected.count at pair \(1,\) \(4 tokens against 3\)"),
    (dict(reference_chosen=S2), ValueError, r"reference_chosen is given but reference_rejected is None"),
    (dict(loss_type="sigmoid"), ValueError, r"loss_type='sigmoid' compares the policy with a reference model, but no reference"),
    (dict(REF, loss_type="simpo"), ValueError, r"loss_type='simpo' is reference-free by definition"),
    (dict(REF, loss_type="orpo"), ValueError, r"loss_type='orpo' is reference-free"),
    (dict(REF, loss_type="cpo"), ValueError, r"loss_type='cpo' is reference-free"),
    (dict(REF, loss_type="dpo"), ValueError, r"loss_type must be one of \('sigmoid'.*got 'dpo'. 'dpo' is loss_type='sigmoid'"),
    (dict(REF, loss_type="kto_pair"), ValueError, r"got 'kto_pair'. 'kto_pair' .* is not implemented here"),
    (dict(REF, loss_type="nonsense"), ValueError, r"loss_type must be one of .*got 'nonsense'.$"),
    (dict(REF, label_smoothing=0.6), ValueError, r"label_smoothing must be <= 0.5; got 0.6"),
    (dict(REF, label_smoothing=-0.1), ValueError, r"label_smoothing must be >= 0.0"),
    (dict(REF, loss_type="robust", label_smoothing=0.5), ValueError, r"label_smoothing must be < 0.5 for loss_type='robust'"),
    (dict(REF, loss_type="hinge", label_smoothing=0.1), ValueError, r"label_smoothing=0.1 smooths the logistic losses"),
    (dict(REF, beta=0.0), ValueError, r"beta must be > 0.0; got 0.0"),
    (dict(REF, gamma=1.0), ValueError, r"gamma=1.0 is SimPO's target margin .*loss_type='sigmoid'"),
    (dict(REF, nll_coef=-1.0), ValueError, r"nll_coef must be >= 0.0"),
    (dict(REF, num_chosen_tokens=5), ValueError, r"num_chosen_tokens=5 divides the chosen responses' NLL"),
    (dict(REF, num_pairs=1), ValueError, r"num_pairs counts the counted pairs .* at least 2 .*got 1.0"),
    (dict(loss_type="cpo", num_chosen_tokens=4), ValueError, r"num_chosen_tokens counts .* at least 5 .*got 4.0"),
    (dict(REF, num_pairs=np.ones(2)), TypeError, r"num_pairs must be a number or a 0-d array"),
    (dict(REF, beta=jnp.float32(0.1)), TypeError, r"beta must be a Python float"),
]  # fmt: skip


@pytest.mark.parametrize("changes, error, message", PREFERENCE_ERRORS)
def test_preference_loss_raises_naming_the_argument(changes, error, message):
    arguments = {"chosen": S2, "rejected": S2, **changes}
    with pytest.raises(error, match=message):
        preference_loss(arguments.pop("chosen"), arguments.pop("rejected"), **arguments)


TOKENS = np.zeros((4, 3), np.float32)
SEQUENCE_ERRORS = [
    (lambda: sequence_log_probs(TOKENS), ValueError, r"pass exactly one of mask= .* got neither"),
    (lambda: sequence_log_probs(TOKENS, mask=TOKENS > 0, segment_ids=np.ones((4, 3), int)), ValueError, r"got both"),
    (lambda: sequence_log_probs(TOKENS, mask=np.ones((4, 3), int)), TypeError, r"mask must be a boolean array of shape \(4, 3\)"),
    (lambda: sequence_log_probs(TOKENS, mask=np.ones((4, 2), bool)), ValueError, r"mask must have token_log_probs' shape \(4, 3\)"),
    (lambda: sequence_log_probs(TOKENS, mask=TOKENS > 0, num_segments=2), ValueError, r"num_segments=2 applies to segment_ids= only"),
    (lambda: sequence_log_probs(TOKENS, segment_ids=np.ones((4, 3), np.int32)), ValueError, r"segment_ids= needs num_segments="),
    (lambda: sequence_log_probs(TOKENS, segment_ids=np.full((4, 3), 3), num_segments=2), ValueError, r"segment_ids must be in 0..num_segments = 0..2; got 3 at position \(0, 0\)"),
    (lambda: sequence_log_probs(TOKENS, segment_ids=TOKENS, num_segments=2), TypeError, r"segment_ids must be integers"),
    (lambda: sequence_log_probs(TOKENS, segment_ids=np.ones((4, 3), int), num_segments=2.0), TypeError, r"num_segments must be an int"),
    (lambda: sequence_log_probs(TOKENS.astype(np.int32), mask=TOKENS > 0), TypeError, r"token_log_probs must be a floating-point array"),
    (lambda: sequence_log_probs(TOKENS[0], mask=TOKENS[0] > 0), ValueError, r"token_log_probs must be \[B, L\]"),
    (lambda: preference_pairs(S3), ValueError, r"sequences holds 3 responses .* an odd number"),
    (lambda: preference_pairs(S2, "alternating"), ValueError, r"layout must be one of \('interleaved', 'halves'\); got 'alternating'"),
    (lambda: preference_pairs(SequenceLogProbs(np.zeros((2, 3), F32), np.ones((2, 3), np.int32))), ValueError, r"num_segments must be even; got 3"),
    (lambda: preference_pairs((S2.total, S2.count)), TypeError, r"sequences must be a SequenceLogProbs"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, message", SEQUENCE_ERRORS)
def test_sequence_functions_raise_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


HIDDEN, CLASSIFIER = np.ones((4, 3, 2), F32), np.ones((5, 2), F32)
LINEAR = dict(mask=np.ones((4, 3), bool), reference=(HIDDEN, CLASSIFIER))
LINEAR_ERRORS = [
    (dict(reference_log_probs=(S2, S2)), ValueError, r"the reference is given twice"),
    (dict(reference=None), ValueError, r"compares the policy with a reference model, but no reference is given: pass reference= or reference_log_probs="),
    (dict(loss_type="simpo"), ValueError, r"loss_type='simpo' is reference-free by definition, but a reference is given \(reference= or reference_log_probs=\)"),
    (dict(reference=None, reference_log_probs=(S3, S3)), ValueError, r"reference_log_probs' chosen must have shape \(2,\), one response per pair .*\(3,\)"),
    (dict(reference=None, reference_log_probs=S2), TypeError, r"reference_log_probs must be a pair \(reference_chosen, reference_rejected\)"),
    (dict(reference=(HIDDEN[:2], CLASSIFIER)), ValueError, r"reference_hidden must score the same tokens as hidden, shape \(4, 3\)"),
    (dict(reference=(HIDDEN, CLASSIFIER[:4])), ValueError, r"reference_classifier must have the policy's vocabulary V = 5"),
    (dict(reference=(HIDDEN, CLASSIFIER.T)), ValueError, r"reference_classifier must have shape \[V, d\] .*transposed"),
    (dict(reference=(S2, S2)), TypeError, r"reference must be a tuple .*reference_log_probs="),
    (dict(reference=(HIDDEN, CLASSIFIER, np.ones(4, F32))), ValueError, r"reference_bias must have one entry per class, shape \(5,\)"),
    (dict(mask=np.ones((3, 3), bool), reference=None, loss_type="cpo"), ValueError, r"mask must have tokens' shape \(4, 3\)"),
    (dict(mask=np.eye(4, 3, dtype=bool)), ValueError, r"pair \(1,\) has an empty rejected response"),
    (dict(mask=None, segment_ids=np.ones((4, 3), np.int32), num_segments=3), ValueError, r"num_segments must be even; got 3"),
    (dict(layout="concatenated"), ValueError, r"layout must be one of"),
    (dict(tokens=np.zeros((4, 2), np.int32)), ValueError, r"tokens must be \[B, L\] .*\(4, 2\)"),
    (dict(mask=np.ones((3, 3), bool), tokens=np.zeros((3, 3), np.int32), hidden=HIDDEN[:3], reference=None, loss_type="orpo"), ValueError, r"the batch holds 3 responses .* odd number"),
]  # fmt: skip


@pytest.mark.parametrize("changes, error, message", LINEAR_ERRORS)
def test_linear_preference_loss_raises_before_computing(changes, error, message):
    arguments = dict(hidden=HIDDEN, classifier=CLASSIFIER, tokens=np.zeros((4, 3), np.int32),
                     **LINEAR)  # fmt: skip
    arguments.update(changes)
    with pytest.raises(error, match=message):
        linear_preference_loss(arguments.pop("hidden"), arguments.pop("classifier"),
                               arguments.pop("tokens"), **arguments)  # fmt: skip


def test_public_api_lists_them():
    names = {"sequence_log_probs", "SequenceLogProbs", "preference_pairs", "preference_loss",
             "PreferenceMetrics", "linear_preference_loss", "sharded_linear_preference_loss"}  # fmt: skip
    assert names <= set(jaxsoftmax.__all__)
    assert all(f":func:`{n}`" in jaxsoftmax.__doc__ or f":class:`{n}`" in jaxsoftmax.__doc__
               for n in names)  # fmt: skip

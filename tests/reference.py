"""Independent float64 NumPy references for the tests.

Written from the documented semantics (PyTorch's ``F.cross_entropy`` for weights,
ignore_index, label smoothing and reductions; PaLM's z-loss; Gemma 2's soft cap), not
from the library's code: nothing here imports jaxsoftmax.
"""

import numpy as np


def log_softmax(z, mask=None):
    z = np.asarray(z, np.float64)
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    lse = m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
    return z - lse, lse[..., 0]


def cross_entropy(
    z,
    targets,
    *,
    where=None,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    logit_softcap=None,
    reduction="mean",
):
    """Loss of class-last logits ``z [..., C]``, computed in float64.

    Returns the reduced loss (or per-example losses for ``reduction="none"``).
    """
    z = np.asarray(z, np.float64)
    c = z.shape[-1]
    integer = np.issubdtype(np.asarray(targets).dtype, np.integer)
    if logit_softcap is not None:
        z = logit_softcap * np.tanh(z / logit_softcap)
    class_mask = row_mask = None
    if where is not None:
        where = np.asarray(where)
        if where.shape == z.shape:
            class_mask = where
        else:
            row_mask = where
    participating = np.ones(z.shape, bool) if class_mask is None else class_mask
    k = np.maximum(participating.sum(-1, keepdims=True), 1)
    w = np.ones(c) if class_weights is None else np.asarray(class_weights, np.float64)
    logp, lse = log_softmax(z, class_mask)
    logp_unmasked = z - lse[..., None]
    eps = label_smoothing
    if integer:
        t = np.asarray(targets)
        ignored = np.zeros(t.shape, bool) if ignore_index is None else t == ignore_index
        safe = np.where(ignored, 0, t)
        nll = -np.take_along_axis(logp_unmasked, safe[..., None], -1)[..., 0] * w[safe]
        loss = (1 - eps) * nll
        if eps:
            loss = loss - eps * np.sum(np.where(participating, w * logp, 0.0), -1) / k[..., 0]
        row_weight = w[safe]
    else:
        y = np.asarray(targets, np.float64)
        ignored = np.zeros(z.shape[:-1], bool)
        q = w * ((1 - eps) * np.where(participating, y, 0.0) + eps * participating / k)
        loss = -np.sum(q * np.where(q != 0, logp, 0.0), -1)
        row_weight = np.ones(z.shape[:-1])
    loss = loss + z_loss * row_weight * lse**2
    dropped = ignored | ~participating.any(-1)
    if row_mask is not None:
        dropped = dropped | ~row_mask
    loss = np.where(dropped, 0.0, loss)
    row_weight = np.where(dropped, 0.0, row_weight)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / row_weight.sum() if row_weight.sum() > 0 else 0.0


def closed_form_gradient(z, labels, g=1.0):
    """The seeds' result in float64: ``(softmax(z) - one_hot(labels)) * g`` per row."""
    z = np.asarray(z, np.float64)
    logp, _ = log_softmax(z)
    y = np.eye(z.shape[-1])[np.asarray(labels)]
    return (np.exp(logp) - y) * np.asarray(g, np.float64)[..., None]


def loss_and_gradient(z, y):
    """Per-row ``-sum_c y_c log softmax(z)_c`` and its gradient ``softmax(z) sum(y) - y``.

    float64, with ``log softmax(z) = (z - max z) - log sum exp(z - max z)`` never forming
    ``log sum exp(z)`` itself: at ``|z| ~ 1e30`` that sum rounds to ``max z`` even in float64
    and would lose ``log 2`` for two tied maxima. Classes with ``y_c = 0`` add nothing (so
    ``-inf`` logits there give finite results). ``y`` has the logits' shape.
    """
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    shifted = z - np.max(z, axis=-1, keepdims=True)
    logp = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    loss = -np.sum(y * np.where(y != 0, logp, 0.0), axis=-1)
    gradient = np.exp(logp) * np.sum(y, axis=-1, keepdims=True) - y
    return loss, gradient


def companions(z, targets, *, where=None, ignore_index=None, class_weights=None, z_loss=0.0,
               logit_softcap=None):  # fmt: skip
    """``(lse, z_loss, correct, entropy)`` per example in float64, from their definitions:
    the log-sum-exp of the (capped, masked) logits, ``z_loss * w[label] * lse^2``, whether
    the first largest logit's class is the label (the target's first largest class), and
    ``-sum_c p_c log p_c``; 0 and False on examples that do not count."""
    z = np.asarray(z, np.float64)
    if logit_softcap is not None:
        z = logit_softcap * np.tanh(z / logit_softcap)
    class_mask = row_mask = None
    if where is not None:
        where = np.asarray(where)
        class_mask, row_mask = (where, None) if where.shape == z.shape else (None, where)
    with np.errstate(divide="ignore", invalid="ignore"):  # a row without classes: -inf, nan
        logp, lse = log_softmax(z, class_mask)
        p = np.exp(logp)
        entropy = -np.sum(np.where(p > 0, p * logp, 0.0), -1)
    masked = z if class_mask is None else np.where(class_mask, z, -np.inf)
    predicted = np.argmax(masked, -1)
    t = np.asarray(targets)
    if np.issubdtype(t.dtype, np.integer):
        ignored = np.zeros(t.shape, bool) if ignore_index is None else t == ignore_index
        correct = predicted == t
        w = np.ones(z.shape[-1]) if class_weights is None else np.asarray(class_weights)
        r = w[np.where(ignored | (t < 0), 0, t)]
    else:
        ignored = np.zeros(z.shape[:-1], bool)
        y = t if class_mask is None else np.where(class_mask, t, -np.inf)
        correct = predicted == np.argmax(y, -1)
        r = 1.0
    dropped = ignored
    if class_mask is not None:
        dropped = dropped | ~class_mask.any(-1)
    if row_mask is not None:
        dropped = dropped | ~row_mask
    lse, entropy = np.where(dropped, 0.0, lse), np.where(dropped, 0.0, entropy)
    return lse, z_loss * r * lse**2, correct & ~dropped, entropy


def distillation(
    student,
    teacher,
    *,
    divergence="forward_kl",
    temperature=1.0,
    beta=0.5,
    labels=None,
    hard_weight=0.0,
    where=None,
    ignore_index=None,
    vocab_mask=None,
    reduction="mean",
):
    """Knowledge distillation's loss of class-last logits, in float64, from the definitions:
    ``T^2 D(p, q) + h CE(z_s, y)`` with ``p = softmax(z_s / T)``, ``q = softmax(z_t / T)``,
    ``D`` the forward KL ``KL(q || p)`` (Hinton et al. 2015), the reverse KL ``KL(p || q)``
    or the generalized JSD ``beta KL(q || m) + (1 - beta) KL(p || m)``, ``m = beta q + (1 -
    beta) p``; ``0 log 0 = 0``; the mean over kept rows."""
    s = np.asarray(student, np.float64)
    t = np.asarray(teacher, np.float64)
    log_p, _ = log_softmax(s / temperature, vocab_mask)
    log_q, _ = log_softmax(t / temperature, vocab_mask)
    p, q = np.exp(log_p), np.exp(log_q)

    def kl(x, log_x, log_y):  # sum x (log x - log y), 0 where x = 0
        with np.errstate(invalid="ignore"):
            return np.sum(np.where(x > 0, x * (log_x - log_y), 0.0), axis=-1)

    if divergence == "forward_kl":
        rows = kl(q, log_q, log_p)
    elif divergence == "reverse_kl":
        rows = kl(p, log_p, log_q)
    else:
        with np.errstate(divide="ignore"):
            log_m = np.log(beta * q + (1 - beta) * p)
        rows = beta * kl(q, log_q, log_m) + (1 - beta) * kl(p, log_p, log_m)
    rows = temperature**2 * rows
    if hard_weight:
        rows = rows + hard_weight * cross_entropy(
            s if vocab_mask is None else np.where(vocab_mask, s, -np.inf),
            np.where(labels == ignore_index, 0, labels) if ignore_index is not None else labels,
            reduction="none",
        )
    kept = np.ones(rows.shape, bool)
    if where is not None:
        kept &= np.asarray(where)
    if ignore_index is not None:
        kept &= np.asarray(labels) != ignore_index
    rows = np.where(kept, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(kept.sum(), 1)


def rowwise_gradient(per_row, x, step=1e-5):
    """``d per_row(x)[r] / d x[r, c]`` by central differences in float64 (error ~1e-10).

    Each row's value depends on its own row of ``x`` only, so one step of class ``c`` in
    every row at once gives column ``c`` of every row's gradient."""
    x = np.asarray(x, np.float64)
    grad = np.empty_like(x)
    for c in range(x.shape[-1]):
        up, down = x.copy(), x.copy()
        up[:, c] += step
        down[:, c] -= step
        grad[:, c] = (per_row(up) - per_row(down)) / (2 * step)
    return grad


def check_grads_in_one_program(f, args, order, modes):
    """The checks of ``jax.test_util.check_grads(f, args, order, modes)`` (its directions,
    steps and tolerances: its own ``check_jvp`` and ``check_vjp``), with every evaluation
    they make in one jitted program.

    ``check_grads`` evaluates ``jax.jit(f)`` under a new transformation for each check (the
    jvp, the vjp, the jvp of the vjp, ...), each a program of its own: 13 for order 2 and
    both modes. Here a first pass runs the checks answering each evaluation with zeros of
    its shape and records it; one program computes every recorded evaluation; a second pass
    runs the checks again, answered with those results (the checks draw the same directions
    from the same seeds, so they ask for the same evaluations: asserted). A JAX helper, not a
    reference: it imports JAX itself, the rest of this module is NumPy only."""
    import functools

    import jax
    from jax.test_util import check_jvp, check_vjp

    calls, results, answered, shapes = [], [], [0], {}

    def evaluate(fn, *fn_args):
        if not results:  # recording
            calls.append((fn, fn_args))
            leaves, tree = jax.tree.flatten(fn_args)
            key = (fn, tree, tuple((np.shape(x), np.result_type(x)) for x in leaves))
            if key not in shapes:  # a trace each: the same function at the same shapes once
                shapes[key] = jax.eval_shape(fn, *fn_args)
            return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes[key])
        jax.tree.map(np.testing.assert_array_equal, fn_args, calls[answered[0]][1])
        answered[0] += 1
        return results[answered[0] - 1]

    def run_checks(h, h_args, order, err_msg=""):
        value = lambda *a: evaluate(h, *a)
        if "fwd" in modes:
            fwd_msg = f"JVP of {err_msg}" if err_msg else "JVP"
            jvp = functools.partial(jax.jvp, h)
            check_jvp(value, lambda a, t: evaluate(jvp, a, t), h_args, err_msg=fwd_msg)
            if order > 1:
                run_checks(jvp, (h_args, h_args), order - 1, fwd_msg)
        if "rev" in modes:
            rev_msg = f"VJP of {err_msg}" if err_msg else "VJP"
            primal = lambda *a: jax.vjp(h, *a)[0]
            pullback = lambda a, ct: jax.vjp(h, *a)[1](ct)
            check_vjp(
                value,
                lambda *a: (evaluate(primal, *a), lambda ct: evaluate(pullback, a, ct)),
                h_args,
                err_msg=rev_msg,
            )
            if order > 1:

                def h_vjp(*a):
                    out, vjp_fn = jax.vjp(h, *a)
                    return vjp_fn(out)

                run_checks(h_vjp, h_args, order - 1, rev_msg)

    run_checks(f, tuple(args), order)  # recording: zeros pass every check
    results.extend(
        jax.jit(lambda every_args: [fn(*a) for (fn, _), a in zip(calls, every_args, strict=True)])(
            [a for _, a in calls]
        )
    )
    run_checks(f, tuple(args), order)
    assert answered[0] == len(calls)

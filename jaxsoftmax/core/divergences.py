"""The distillation rule: three divergences between two softmaxes and their derived gradients.

For one row with student logits ``z_s``, teacher logits ``z_t`` and temperature ``T``, write
``a = z_s / T``, ``b = z_t / T``, ``p = softmax(a)`` (the student) and ``q = softmax(b)``
(the teacher). The per-row losses and the gradients with respect to the logits (derived step
by step in docs/derivation.md, section 9) are::

    forward_kl   L = T^2 sum_c q_c (log q_c - log p_c)                 = T^2 KL(q || p)
                 dL/dz_s = T (p - q)
                 dL/dz_t = T q (log q - log p - KL(q || p))
    reverse_kl   L = T^2 sum_c p_c (log p_c - log q_c)                 = T^2 KL(p || q)
                 dL/dz_s = T p (log p - log q - KL(p || q))
                 dL/dz_t = T (q - p)
    jsd          L = T^2 (beta KL(q || m) + (1 - beta) KL(p || m)),    m = beta q + (1 - beta) p
                 dL/dz_s = T (1 - beta) p (log p - log m - KL(p || m))
                 dL/dz_t = T beta q (log q - log m - KL(q || m))

The student's forward-KL gradient is the cross-entropy rule's ``softmax - target`` with the
teacher's distribution as the target; the teacher's is the student's reverse-KL gradient with
the roles swapped. Each gradient row sums to 0 and all vanish where ``p = q``.

Numerics: ``log p = (a - m_a) - log sum exp(a - m_a)`` from the per-row statistics (never the
log of a softmax), ``log m = logaddexp(log beta + log q, log(1 - beta) + log p)``. A class
of probability 0 (``-inf`` logits under a vocabulary mask) contributes 0 to every sum and gets
a zero gradient: the product is taken only where the probability is positive, so ``0 log 0``
never becomes ``0 * inf``. bf16 and f16 are computed in float32.

The functions work on class-last arrays of any leading shape, whole rows or one tile of them
(the fused loss, :mod:`jaxsoftmax.tiles.distillation`, sums the tiles itself):

* :func:`scaled`: ``z / T`` in the compute dtype, masked classes ``-inf``;
* :func:`kl_summands`: the per-class terms whose row sums are the KL terms;
* :func:`row_divergence`: the loss (without ``T^2``) from those sums;
* :func:`logits_gradients`: the two gradients above, per unit of the row's cotangent.

:func:`distillation_rows` is the rule for whole rows: a ``jax.custom_jvp`` whose tangent is
``<dL/dz_s, dz_s> + <dL/dz_t, dz_t>`` with the derived gradients. Forward mode evaluates that
tangent; reverse mode (``jax.grad``) transposes it, giving ``g * dL/dz`` for each input: the
same derived rule as a ``custom_vjp``'s backward, with forward mode besides (a ``custom_vjp``
refuses ``jax.jvp``). The tangent is rematerialized (``jax.checkpoint``), so the residuals are
the logits and per-row numbers only: each row's ``(m, log_sum)`` for ``a`` and ``b`` and its
KL terms.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxsoftmax.core import row_terms

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class DivergenceOptions:
    """The static options of the divergence: which one, ``T`` and the JSD's ``beta``."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5


def scaled(logits, vocab_mask, options: DivergenceOptions, dtype=None):
    """``z / T`` in the compute dtype (``dtype``, or the logits'), ``-inf`` on classes that
    ``vocab_mask`` (bool ``[C]``, or None) leaves out."""
    x = logits.astype(dtype or row_terms.compute_dtype(logits.dtype))
    if options.temperature != 1.0:
        x = x / options.temperature
    if vocab_mask is None:
        return x
    return jnp.where(vocab_mask.reshape((1,) * (x.ndim - 1) + vocab_mask.shape), x, -jnp.inf)


def log_probabilities(x, statistics):
    """``log softmax(x) = (x - m) - log_sum`` from the row's ``(m, log_sum)``."""
    top, log_sum = statistics
    return (x - top) - log_sum


def _where_positive(probability, value):
    """``probability * value`` where the probability is positive, else 0 (``0 log 0 = 0``)."""
    return jnp.where(probability > 0, probability * value, 0.0)


def mixture_log(log_p, log_q, beta: float):
    """``log m`` for ``m = beta q + (1 - beta) p``, from the two log-probabilities."""
    return jnp.logaddexp(math.log(beta) + log_q, math.log1p(-beta) + log_p)


def kl_summands(log_p, log_q, options: DivergenceOptions):
    """The per-class terms whose sums over the classes are the row's KL terms: ``(q (log q -
    log p),)`` for forward KL, ``(p (log p - log q),)`` for reverse KL, ``(q (log q - log m),
    p (log p - log m))`` for the JSD."""
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    if options.divergence == "forward_kl":
        return (_where_positive(q, log_q - log_p),)
    if options.divergence == "reverse_kl":
        return (_where_positive(p, log_p - log_q),)
    log_m = mixture_log(log_p, log_q, options.beta)
    return _where_positive(q, log_q - log_m), _where_positive(p, log_p - log_m)


def row_divergence(terms, options: DivergenceOptions):
    """The row's divergence (without ``T^2``) from its KL terms (:func:`kl_summands`' sums)."""
    if options.divergence != "jsd":
        return terms[0]
    teacher_term, student_term = terms
    return options.beta * teacher_term + (1.0 - options.beta) * student_term


def logits_gradients(log_p, log_q, terms, options: DivergenceOptions, student=True, teacher=True):
    """``(dL/dz_s, dL/dz_t)`` for a row cotangent of 1 (see the module docstring); either is
    None when not asked for. ``terms`` are the row's KL terms, ``[..., 1]`` each."""
    t, beta = options.temperature, options.beta
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    d_student = d_teacher = None
    if options.divergence == "forward_kl":
        (kl,) = terms
        d_student = t * (p - q) if student else None
        d_teacher = t * _where_positive(q, log_q - log_p - kl) if teacher else None
    elif options.divergence == "reverse_kl":
        (kl,) = terms
        d_student = t * _where_positive(p, log_p - log_q - kl) if student else None
        d_teacher = t * (q - p) if teacher else None
    else:
        teacher_term, student_term = terms
        log_m = mixture_log(log_p, log_q, beta)
        if student:
            d_student = (t * (1.0 - beta)) * _where_positive(p, log_p - log_m - student_term)
        if teacher:
            d_teacher = (t * beta) * _where_positive(q, log_q - log_m - teacher_term)
    return d_student, d_teacher


def wider_compute_dtype(*dtypes):
    """The compute dtype of the widest of ``dtypes``: float32 for a bf16 teacher and a float32
    student, float64 when either is float64 (no implicit promotion between bf16 and f16)."""
    return row_terms.compute_dtype(max((jnp.dtype(d) for d in dtypes), key=lambda d: d.itemsize))


def _statistics(x):
    return row_terms.row_statistics(x, None, row_terms.RuleOptions())


def _forward(student_logits, teacher_logits, vocab_mask, row_mask, options):
    """Per-row loss ``[...]`` (``T^2`` times the divergence, 0 on dropped rows) and the
    residual numbers per row: ``(statistics of a, statistics of b, KL terms)``."""
    dtype = wider_compute_dtype(student_logits.dtype, teacher_logits.dtype)
    a = scaled(student_logits, vocab_mask, options, dtype)
    b = scaled(teacher_logits, vocab_mask, options, dtype)
    statistics_a, statistics_b = _statistics(a), _statistics(b)
    log_p, log_q = log_probabilities(a, statistics_a), log_probabilities(b, statistics_b)
    terms = tuple(jnp.sum(s, axis=-1, keepdims=True) for s in kl_summands(log_p, log_q, options))
    loss = options.temperature**2 * row_divergence(terms, options)
    if row_mask is not None:
        loss = jnp.where(row_mask[..., None], loss, 0.0)
    return loss[..., 0], (statistics_a, statistics_b, terms)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def distillation_rows(student_logits, teacher_logits, vocab_mask, row_mask, options):
    """Per-row ``T^2 D(p, q)`` of class-last logits ``[..., C]``, differentiated by the rule.

    ``vocab_mask`` (bool ``[C]``) and ``row_mask`` (bool ``[...]``) may be None; the loss is
    in float32 for bf16/f16 logits.
    """
    return _forward(student_logits, teacher_logits, vocab_mask, row_mask, options)[0]


def _rows_jvp(options, primals, tangents):
    student_logits, teacher_logits, vocab_mask, row_mask = primals
    loss, statistics = _forward(*primals, options)
    d_student, d_teacher = (
        None if type(t) is jax.custom_derivatives.SymbolicZero else t for t in tangents[:2]
    )

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def tangent(residuals, d_student, d_teacher):
        student_logits, teacher_logits, vocab_mask, row_mask, statistics = residuals
        statistics_a, statistics_b, terms = statistics
        a = scaled(student_logits, vocab_mask, options, loss.dtype)
        b = scaled(teacher_logits, vocab_mask, options, loss.dtype)
        log_p, log_q = log_probabilities(a, statistics_a), log_probabilities(b, statistics_b)
        gradients = logits_gradients(
            log_p, log_q, terms, options, d_student is not None, d_teacher is not None
        )
        out = jnp.zeros(loss.shape, loss.dtype)
        for gradient, dz in zip(gradients, (d_student, d_teacher)):
            if dz is not None:  # a dropped row's gradient is 0 (not NaN, whatever its logits)
                if row_mask is not None:
                    gradient = jnp.where(row_mask[..., None], gradient, 0.0)
                out = out + jnp.sum(gradient * dz.astype(loss.dtype), axis=-1)
        return out

    residuals = (student_logits, teacher_logits, vocab_mask, row_mask, statistics)
    return loss, tangent(residuals, d_student, d_teacher)


distillation_rows.defjvp(_rows_jvp, symbolic_zeros=True)

"""Checked mode: label range checks, in Python where labels are known and under ``jit``.

A label outside ``[0, num_classes)`` is a run-time value: under ``jit`` it cannot raise a
Python exception, and unchecked the rule makes that example's loss and gradient NaN. A loss
called with ``checked=True`` checks its labels in one of two ways:

* **labels known in Python** (an eager call, or labels closed over as constants): they are
  checked before any computation, and a bad one raises a ``ValueError`` naming the argument,
  the label and its position. No wrapper is needed.
* **traced labels** (under ``jax.jit``, ``vmap``, ``shard_map``...): the loss adds a
  :func:`jax.experimental.checkify.check`, and the call must run under :func:`checked`,
  which turns a failed check into a ``JaxRuntimeError`` naming the label and its position.
  Without it the loss raises a ``ValueError`` at trace time that says so.

:func:`checked` must be the outermost wrapper, because the error is raised after the compiled
function returns::

    loss_fn = jaxsoftmax.checked(jax.jit(functools.partial(cross_entropy, checked=True)))
    loss_fn(logits, labels)  # works: raises JaxRuntimeError naming the label and its index

    jax.jit(jaxsoftmax.checked(...))  # fails at trace time: use checked(..., throw=False)

To compile the checked function itself, use ``checked(fn, throw=False)``, which returns
``(error, out)`` as :func:`jax.experimental.checkify.checkify` does, jit that, and call
``error.throw()`` outside.
"""

from __future__ import annotations

import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

# True while a function runs under `checked`, which functionalizes the checks it traces.
_functionalized = contextvars.ContextVar("jaxsoftmax_checked", default=False)


def _message(name: str, num_classes, ignore_index, hint: str, vocab_mask=None) -> str:
    """The error message, with ``{label}`` and ``{position}`` left to fill in."""
    expected = f"0 <= label < {num_classes}"
    if vocab_mask is not None:
        expected += " on a class vocab_mask keeps"
    if ignore_index is not None:
        expected += f" or label == ignore_index ({ignore_index})"
    return (
        f"{name} out of range: found label {{label}} at position {{position}}; expected "
        f"{expected}.{hint}"
    )


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _staging() -> bool:
    """Whether the caller is being traced into a compiled program (``jit``, ``shard_map``...).

    Under such a trace every new value is a tracer; under ``vmap`` or ``grad`` alone, or
    eagerly, a constant stays a concrete array.
    """
    return _is_traced(jnp.zeros((), jnp.int32) + 1)


def check_labels_or_defer(
    labels,
    num_classes: int | None,
    row_mask=None,
    *,
    name: str = "labels",
    ignore_index: int | None = None,
    hint: str = "",
    vocab_mask=None,
) -> bool:
    """Checks labels known in Python now; returns True when the check must be staged.

    With concrete ``labels`` (and ``row_mask``) and a known ``num_classes``, a bad label
    raises a ``ValueError`` here, before any computation, and the result is False. With
    traced ones (or ``num_classes=None``: the total is only known inside a mapped axis) the
    caller must stage :func:`check_labels`, which only works under :func:`checked`; outside
    it this raises a ``ValueError`` saying so.

    Args:
      labels: integer labels ``[...]``.
      num_classes: the number of classes, or None when it is not known here.
      row_mask: bool ``[...]`` of the rows that count (others are not checked), or None.
      name: the argument's name, for the message.
      ignore_index: labels equal to it are not checked.
      hint: a sentence appended to the message (how to leave an example out).
      vocab_mask: bool ``[num_classes]``: labels on classes it leaves out are bad too.
    """
    traced = any(_is_traced(x) for x in (labels, row_mask, vocab_mask))
    if num_classes is not None and not traced:
        values = np.asarray(labels)
        bad = (values < 0) | (values >= num_classes)
        if vocab_mask is not None:
            bad |= ~np.asarray(vocab_mask)[np.clip(values, 0, num_classes - 1)]
        if ignore_index is not None:
            bad &= values != ignore_index
        if row_mask is not None:
            bad &= np.asarray(row_mask)
        if np.any(bad):
            flat = int(np.argmax(bad.reshape(-1)))
            position = np.asarray(np.unravel_index(flat, values.shape), np.int64)
            raise ValueError(
                _message(name, num_classes, ignore_index, hint, vocab_mask).format(
                    label=values.reshape(-1)[flat], position=position
                )
            )
        return False
    if not _functionalized.get():
        raise ValueError(
            f"checked=True cannot check {name} here: they are traced (under jax.jit, vmap, "
            "shard_map or similar), so a bad label can only raise through "
            "jax.experimental.checkify, and this call does not run under jaxsoftmax.checked. "
            "Make it the outermost wrapper: jaxsoftmax.checked(jax.jit(loss_fn))(...), not "
            "jax.jit(loss_fn)(...) or jax.jit(jaxsoftmax.checked(loss_fn))(...)."
        )
    return True


def check_labels(
    labels,
    num_classes: int,
    row_mask=None,
    *,
    name: str = "labels",
    ignore_index: int | None = None,
    hint: str = "",
    vocab_mask=None,
):
    """Adds a checkify check that every counted label lies in ``[0, num_classes)`` (and on a
    class ``vocab_mask`` keeps, when given).

    Only functionalized under :func:`checked`; see :func:`check_labels_or_defer`.

    Args:
      labels: integer labels ``[...]``.
      num_classes: the number of classes.
      row_mask: bool ``[...]`` of the rows that count (others are not checked), or None.
      name: the argument's name, for the message.
      ignore_index: labels equal to it are not checked.
      hint: a sentence appended to the message (how to leave an example out).
    """
    bad = (labels < 0) | (labels >= num_classes)
    if vocab_mask is not None:
        bad = bad | ~jnp.take(vocab_mask, jnp.clip(labels, 0, num_classes - 1))
    if ignore_index is not None:
        bad = bad & (labels != ignore_index)
    if row_mask is not None:
        bad = bad & row_mask
    flat = jnp.argmax(bad.reshape(-1))
    if labels.ndim:
        position = jnp.stack(jnp.unravel_index(flat, labels.shape))
    else:
        position = jnp.zeros((0,), jnp.int32)
    checkify.check(
        ~jnp.any(bad),
        _message(name, num_classes, ignore_index, hint, vocab_mask),
        label=labels.reshape(-1)[flat],
        position=position,
    )


def checked(fn, *, throw: bool = True):
    """Runs ``fn`` (jitted or not) so that label checks of ``checked=True`` losses raise.

    Must be the outermost wrapper: ``checked(jax.jit(fn))`` works, ``jax.jit(checked(fn))``
    raises a ``ValueError`` at trace time (the error is raised after the compiled function
    returns, which cannot happen inside it). A loss with ``checked=True`` and traced labels
    that runs without this wrapper raises a ``ValueError`` telling you to add it. One
    exception: a ``jax.jit``-ed function first traced under ``checked`` keeps its check in
    JAX's trace cache, so calling that same jitted function later without ``checked``
    fails with JAX's own "checkify.check which was not functionalized" error.

    Args:
      fn: the function to run; its losses called with ``checked=True``.
      throw: raise a failed check (the default). With False, return ``(error, out)``
        as :func:`jax.experimental.checkify.checkify` does; that function may itself be
        jitted, ``err, out = jax.jit(checked(fn, throw=False))(...)``, and ``err.throw()``
        raises outside.

    Returns:
      A function with ``fn``'s arguments, returning ``fn``'s output (``(error, output)``
      with ``throw=False``). A bad label raises ``JaxRuntimeError`` (traced labels) or
      ``ValueError`` (labels known in Python), naming the label and its position.

    Example:
      >>> import functools, jax, jax.numpy as jnp, jaxsoftmax
      >>> loss_fn = functools.partial(jaxsoftmax.cross_entropy, checked=True)
      >>> safe = jaxsoftmax.checked(jax.jit(loss_fn))
      >>> print(f"{float(safe(jnp.zeros((2, 3)), jnp.array([0, 2]))):.4f}")
      1.0986
      >>> safe(jnp.zeros((2, 3)), jnp.array([0, 3]))
      Traceback (most recent call last):
        ...
      jax._src.checkify.JaxRuntimeError: targets out of range: found label 3 at position [1]; ...
    """
    checkified = checkify.checkify(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if throw and _staging():
            raise ValueError(
                "jaxsoftmax.checked must be the outermost wrapper: it raises after the compiled "
                "function returns, which cannot happen inside jax.jit (or shard_map, scan...). "
                "Use jaxsoftmax.checked(jax.jit(fn)), or jax.jit(jaxsoftmax.checked(fn, "
                "throw=False)) and call err.throw() on the returned error outside."
            )
        token = _functionalized.set(True)
        try:
            error, out = checkified(*args, **kwargs)
        finally:
            _functionalized.reset(token)
        if not throw:
            return error, out
        error.throw()
        return out

    return wrapper

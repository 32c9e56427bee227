"""Checked mode: label range checks that survive ``jit``.

A label outside ``[0, num_classes)`` is a run-time value, so under ``jit`` it cannot raise
a Python exception. Unchecked, the rule makes that row's loss and gradient NaN. With
``checked=True`` the losses add a :func:`jax.experimental.checkify.check` that names the
first bad label and its position; run the function through :func:`checked` (or
``checkify.checkify`` and ``err.throw()`` yourself) to turn it into an exception::

    loss_fn = jaxsoftmax.checked(jax.jit(functools.partial(cross_entropy, checked=True)))
    loss_fn(logits, labels)   # raises JaxRuntimeError naming the label and its index
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import checkify


def check_labels(labels, num_classes: int, row_mask=None, *, name: str = "labels"):
    """Adds a checkify check that every counted label lies in ``[0, num_classes)``.

    Args:
      labels: integer labels ``[...]``.
      num_classes: the number of classes.
      row_mask: bool ``[...]`` of the rows that count (ignored rows are not checked).
      name: the argument's name, for the message.
    """
    bad = (labels < 0) | (labels >= num_classes)
    if row_mask is not None:
        bad = bad & row_mask
    flat = jnp.argmax(bad.reshape(-1)) if labels.ndim else jnp.asarray(0)
    position = jnp.stack(jnp.unravel_index(flat, labels.shape)) if labels.ndim else flat
    checkify.check(
        ~jnp.any(bad),
        f"{name} out of range: found label {{label}} at position {{position}}; expected "
        f"0 <= label < {num_classes} (or ignore_index).",
        label=labels.reshape(-1)[flat] if labels.ndim else labels,
        position=position,
    )


def checked(fn):
    """Wraps ``fn`` (jitted or not) so failed checkify checks raise at the call.

    Use it around a loss called with ``checked=True``. Returns ``fn``'s output.
    """
    checked_fn = checkify.checkify(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        error, out = checked_fn(*args, **kwargs)
        error.throw()
        return out

    return wrapper

"""CS231n's fully connected network as pure functions of a parameter pytree.

The two-layer network of the derivation (docs/derivation.md), for any depth::

    Z1 = X W1 + b1          O1 = f(Z1)          (one hidden layer per entry of ``sizes[1:-1]``)
    scores = O1 W2 + b2     L = mean_n CE(softmax(scores_n), y_n) + 0.5 * l2 * sum_l ||W_l||^2

Parameters are a plain list with one ``{"W": [fan_in, fan_out], "b": [fan_out]}`` dict per layer,
so ``params[0]`` holds the derivation's W1, b1 and ``params[1]`` its W2, b2. There is no class and
no state: every function takes ``params`` first, works on a batch ``x: [N, fan_in]`` and, under
``jax.vmap``, on one example ``x: [fan_in]``.

The cross-entropy goes through :func:`jaxsoftmax.losses.cross_entropy.cross_entropy`, whose backward
rule is the derived result ``dL/dscores = softmax(scores) - y`` (docs/derivation.md; divided by
N for the mean), so ``jax.grad(loss)`` backpropagates that closed form through the layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxsoftmax.losses.cross_entropy import cross_entropy

Params = list[dict[str, jax.Array]]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda z: z,
}

INIT_SCHEMES = ("normal", "he", "glorot")


def activation_function(activation: str) -> Callable[[jax.Array], jax.Array]:
    """The function named ``activation`` (a key of :data:`ACTIVATIONS`), or ``ValueError``."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is not known; expected one of {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[activation]


def init(
    key: jax.Array,
    sizes: Sequence[int],
    *,
    scheme: str = "normal",
    scale: float = 0.01,
    dtype: Any = jnp.float32,
) -> Params:
    """Random weights and zero biases for a network with layer widths ``sizes``.

    ``sizes = [fan_in, hidden_1, ..., num_classes]``; ``[4, 10, 3]`` is the two-layer network of
    the derivation (docs/derivation.md) and ``[2, 3]`` (no hidden layer) a linear softmax
    classifier. Layer ``l`` gets ``W_l ~ std * Normal(0, 1)`` of shape
    ``[sizes[l], sizes[l + 1]]`` and ``b_l = 0``, where

    - ``scheme="normal"``: ``std = scale`` (CS231n's case study uses ``0.01``),
    - ``scheme="he"``: ``std = sqrt(2 / fan_in)`` (suits ReLU; ``scale`` is ignored),
    - ``scheme="glorot"``: ``std = sqrt(2 / (fan_in + fan_out))`` (suits tanh; ``scale`` ignored).

    Args:
      key: a PRNG key; layer ``l`` draws from ``jax.random.fold_in(key, l)``.
      sizes: at least two positive widths.
      scheme: one of ``"normal"``, ``"he"``, ``"glorot"``.
      scale: the standard deviation for ``scheme="normal"``.
      dtype: the floating dtype of the parameters.

    Returns:
      ``[{"W": [sizes[0], sizes[1]], "b": [sizes[1]]}, ...]``, one dict per layer.

    >>> params = init(jax.random.key(0), [4, 10, 3])
    >>> [(p["W"].shape, p["b"].shape) for p in params]
    [((4, 10), (10,)), ((10, 3), (3,))]
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise ValueError(
            f"sizes={sizes} must list at least two positive widths, [fan_in, ..., num_classes]."
        )
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not known; expected one of {list(INIT_SCHEMES)}.")
    params = []
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if scheme == "normal":
            std = scale
        elif scheme == "he":
            std = (2.0 / fan_in) ** 0.5
        else:
            std = (2.0 / (fan_in + fan_out)) ** 0.5
        weights = std * jax.random.normal(jax.random.fold_in(key, layer), (fan_in, fan_out), dtype)
        params.append({"W": weights, "b": jnp.zeros((fan_out,), dtype)})
    return params


def _check_input_width(params: Params, x: jax.Array) -> None:
    """Shape errors that name the layer, raised before any arithmetic (static, so jit-safe)."""
    if x.ndim not in (1, 2):
        raise ValueError(
            f"x has shape {x.shape}; expected [N, fan_in] for a batch or [fan_in] for one example."
        )
    width, width_source = x.shape[-1], f"x with shape {x.shape}"
    for layer, p in enumerate(params):
        w_shape, b_shape = jnp.shape(p["W"]), jnp.shape(p["b"])
        if len(w_shape) != 2 or w_shape[0] != width:
            raise ValueError(
                f"layer {layer}: W has shape {w_shape} but its input, {width_source}, has width "
                f"{width}; expected W of shape [{width}, fan_out]."
            )
        if b_shape != (w_shape[1],):
            raise ValueError(
                f"layer {layer}: b has shape {b_shape}; expected ({w_shape[1]},) to match W of "
                f"shape {w_shape}."
            )
        width, width_source = w_shape[1], f"the output of layer {layer}"


def apply(params: Params, x: jax.typing.ArrayLike, activation: str = "relu") -> jax.Array:
    """The logits (the scores in CS231n's notation) of the network for inputs ``x``.

    ``h_0 = x``, ``h_{l+1} = f(h_l W_l + b_l)`` for hidden layers, ``scores = h_L W_L + b_L``:
    no activation after the last layer, no softmax (the loss applies it).

    Args:
      params: from :func:`init`.
      x: ``[N, fan_in]`` or one example ``[fan_in]``.
      activation: ``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``"identity"``.

    Returns:
      ``[N, num_classes]`` (or ``[num_classes]`` for one example).

    >>> params = init(jax.random.key(0), [4, 10, 3])
    >>> apply(params, jnp.ones((5, 4))).shape
    (5, 3)
    >>> jax.vmap(apply, in_axes=(None, 0))(params, jnp.ones((5, 4))).shape
    (5, 3)
    """
    f = activation_function(activation)
    x = jnp.asarray(x)
    _check_input_width(params, x)
    hidden = x
    for p in params[:-1]:
        hidden = f(_affine(p, hidden))
    return _affine(params[-1], hidden)


def _affine(layer: dict[str, jax.Array], inputs: jax.Array) -> jax.Array:
    """``inputs W + b`` with ``b`` reshaped to the rank of the product (no implicit broadcast)."""
    product = inputs @ layer["W"]
    return product + jnp.reshape(layer["b"], (1,) * (product.ndim - 1) + layer["b"].shape)


def l2_penalty(params: Params) -> jax.Array:
    """``0.5 * sum_l sum_ij W_l[i, j]^2``: the weights only, never the biases (CS231n's convention).

    >>> l2_penalty([{"W": jnp.array([[3.0, 4.0]]), "b": jnp.array([100.0, 100.0])}])
    Array(12.5, dtype=float32)
    """
    return 0.5 * sum(jnp.sum(jnp.square(p["W"])) for p in params)


def loss(
    params: Params,
    x: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    l2: float = 0.0,
    activation: str = "relu",
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Mean cross-entropy of the network plus the L2 penalty on its weights.

    .. math::
        L = \\frac{1}{N} \\sum_n -\\log \\mathrm{softmax}(s_n)_{y_n}
            + \\frac{\\lambda}{2} \\sum_l \\lVert W_l \\rVert_F^2,
        \\qquad s = \\mathrm{apply}(params, x)

    so ``dL/dW_l`` has the extra term ``l2 * W_l`` and the biases are not regularised. The data
    term is the core ``cross_entropy(..., reduction="mean")``; the remaining keyword arguments
    are passed to it unchanged (with ``class_weights`` the mean is weighted, as in PyTorch).

    Args:
      params: from :func:`init`.
      x: ``[N, fan_in]`` or one example ``[fan_in]``.
      labels: integer class indices ``[N]`` (or ``[]`` for one example), or class
        probabilities ``[N, num_classes]``.
      l2: the regularisation strength ``lambda`` (CS231n's ``reg``).
      activation: the hidden activation, as in :func:`apply`.
      where: bool ``[N]``, the examples to count: the mean is over those alone (padding rows
        of a batch split across devices are ``False``; see :mod:`jaxsoftmax.training`).

    Returns:
      A scalar.

    >>> params = init(jax.random.key(0), [4, 10, 3])
    >>> x, y = jnp.zeros((5, 4)), jnp.array([0, 1, 2, 0, 1])
    >>> print(f"{loss(params, x, y):.4f}")  # zero inputs, zero biases: log(3)
    1.0986
    """
    logits = apply(params, x, activation)
    labels = jnp.asarray(labels)
    if where is not None:
        where = jnp.asarray(where)
    if logits.ndim == 1:  # one example, e.g. under vmap: a batch of one
        logits, labels = logits[None], labels[None]
        where = None if where is None else where[None]
    data_loss = cross_entropy(
        logits,
        labels,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        ignore_index=ignore_index,
        where=where,
        reduction="mean",
    )
    if l2 == 0.0:
        return data_loss
    return data_loss + jnp.asarray(l2, data_loss.dtype) * l2_penalty(params).astype(data_loss.dtype)


def predict(params: Params, x: jax.typing.ArrayLike, activation: str = "relu") -> jax.Array:
    """The predicted class, ``argmax_k scores[n, k]``: ``[N]`` integers (``[]`` for one example).

    >>> params = [{"W": jnp.array([[1.0, -1.0]]), "b": jnp.zeros(2)}]
    >>> predict(params, jnp.array([[2.0], [-3.0]]))
    Array([0, 1], dtype=int32)
    """
    return jnp.argmax(apply(params, x, activation), axis=-1)


def accuracy(
    params: Params, x: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, activation: str = "relu"
) -> jax.Array:
    """The fraction of examples whose predicted class equals the integer label.

    >>> params = [{"W": jnp.array([[1.0, -1.0]]), "b": jnp.zeros(2)}]
    >>> accuracy(params, jnp.array([[2.0], [-3.0]]), jnp.array([0, 0]))
    Array(0.5, dtype=float32)
    """
    return jnp.mean(predict(params, x, activation) == jnp.asarray(labels))


def per_example_grads(
    params: Params,
    x: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    **loss_options: Any,
) -> Params:
    """The gradient of :func:`loss` for every example separately, by ``vmap`` of ``grad``.

    ``g_n = d loss(params, x[n], labels[n]) / d params``; every leaf gains a leading axis of
    length N (``W: [N, fan_in, fan_out]``). Each ``g_n`` includes the penalty's ``l2 * W``, so
    without class weights ``mean_n g_n`` equals the gradient of the batch loss. Use it for
    per-example clipping (DP-SGD) or gradient-norm diagnostics.

    Args:
      params: from :func:`init`.
      x: ``[N, fan_in]``.
      labels: ``[N]`` integer class indices (or ``[N, num_classes]`` probabilities).
      **loss_options: the keyword arguments of :func:`loss` (``l2``, ``activation``, ...).
        ``where`` (bool ``[N]``) is split per example like ``x`` and ``labels``: example ``n``
        gets ``where[n]``, so a masked example's gradient is the penalty's ``l2 * W`` alone.

    Returns:
      A pytree shaped like ``params`` with a leading example axis.

    >>> params = init(jax.random.key(0), [4, 10, 3])
    >>> grads = per_example_grads(params, jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
    >>> grads[0]["W"].shape
    (5, 4, 10)
    """

    where = loss_options.pop("where", None)

    def example_loss(p, example_x, example_label, example_where):
        return loss(p, example_x, example_label, where=example_where, **loss_options)

    in_axes = (None, 0, 0, None if where is None else 0)
    return jax.vmap(jax.grad(example_loss), in_axes=in_axes)(params, x, labels, where)

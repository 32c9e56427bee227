"""A small decoder-only transformer (GPT-2's layout) as pure functions of a parameter pytree.

For tokens ``x_1 .. x_T`` of a vocabulary of ``V`` and width ``d``::

    h_0 = E[x_t] + P[t]                                  (token and position embeddings)
    h  <- h + Attention(LayerNorm(h))                    (causal, num_heads heads)
    h  <- h + W_2 gelu(W_1 LayerNorm(h) + b_1) + b_2     (one pair per layer)
    hidden = LayerNorm(h)                                [T, d]
    logits = hidden C^T                                  [T, V]; C = E when tied

Parameters are a plain dict (no class, no state): ``embedding [V, d]``, ``position [T_max, d]``,
``layers`` (a list of dicts, one per layer), ``final_norm`` and, untied, ``classifier [V, d]``.
:func:`hidden_states` stops before the classifier: the loss takes ``hidden`` and
:func:`classifier` to compute ``logits`` and the cross-entropy in one fused pass
(``jaxsoftmax.linear_cross_entropy``), or :func:`logits` builds the ``[T, V]`` array first.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Params = dict


def _dense(key: jax.Array, fan_in: int, fan_out: int, std: float, dtype) -> dict:
    return {
        "W": std * jax.random.normal(key, (fan_in, fan_out), dtype),
        "b": jnp.zeros((fan_out,), dtype),
    }


def _norm(d_model: int, dtype) -> dict:
    return {"scale": jnp.ones((d_model,), dtype), "bias": jnp.zeros((d_model,), dtype)}


def init(
    key: jax.Array,
    *,
    vocab_size: int,
    d_model: int,
    num_layers: int,
    max_len: int,
    d_ff: int | None = None,
    tied: bool = True,
    dtype=jnp.float32,
) -> Params:
    """GPT-2's initialisation: weights ``0.02 * Normal(0, 1)``, the projections that add into
    the residual stream scaled by ``1 / sqrt(2 * num_layers)``, biases 0, norms the identity.

    ``d_ff`` defaults to ``4 * d_model``. ``tied=False`` adds a ``classifier [V, d]`` of its
    own; tied, the classifier is the embedding table.

    >>> params = init(jax.random.key(0), vocab_size=50, d_model=8, num_layers=2, max_len=16)
    >>> params["embedding"].shape, len(params["layers"]), "classifier" in params
    ((50, 8), 2, False)
    """
    d_ff = 4 * d_model if d_ff is None else d_ff
    std, residual_std = 0.02, 0.02 / math.sqrt(2 * num_layers)
    keys = iter(jax.random.split(key, 3 + 4 * num_layers))
    params: Params = {
        "embedding": std * jax.random.normal(next(keys), (vocab_size, d_model), dtype),
        "position": std * jax.random.normal(next(keys), (max_len, d_model), dtype),
        "layers": [
            {
                "attention_norm": _norm(d_model, dtype),
                "qkv": _dense(next(keys), d_model, 3 * d_model, std, dtype),
                "attention_out": _dense(next(keys), d_model, d_model, residual_std, dtype),
                "mlp_norm": _norm(d_model, dtype),
                "mlp_in": _dense(next(keys), d_model, d_ff, std, dtype),
                "mlp_out": _dense(next(keys), d_ff, d_model, residual_std, dtype),
            }
            for _ in range(num_layers)
        ],
        "final_norm": _norm(d_model, dtype),
    }
    classifier_key = next(keys)
    if not tied:
        params["classifier"] = std * jax.random.normal(classifier_key, (vocab_size, d_model), dtype)
    return params


def _lead(vector: jax.Array, ndim: int) -> jax.Array:
    """``vector`` with leading axes of length 1 up to rank ``ndim``: no implicit broadcast."""
    return jnp.reshape(vector, (1,) * (ndim - vector.ndim) + vector.shape)


def layer_norm(p: dict, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    normalised = (x - mean) * jax.lax.rsqrt(variance + eps)
    return normalised * _lead(p["scale"], x.ndim) + _lead(p["bias"], x.ndim)


def _affine(p: dict, x: jax.Array) -> jax.Array:
    product = x @ p["W"]
    return product + _lead(p["b"], product.ndim)


def causal_self_attention(p: dict, x: jax.Array, num_heads: int) -> jax.Array:
    """Multi-head attention of each position over itself and the positions before it.

    ``x: [B, T, d]``; head ``h`` attends with ``softmax(q_h k_h^T / sqrt(d / H) + mask) v_h``,
    the mask ``-inf`` above the diagonal.
    """
    batch, length, d_model = x.shape
    head_width = d_model // num_heads
    qkv = _affine(p["qkv"], x).reshape(batch, length, 3, num_heads, head_width)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, d / H]
    scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / jnp.sqrt(jnp.asarray(head_width, x.dtype))
    causal = jnp.tril(jnp.ones((1, 1, length, length), bool))
    scores = jnp.where(causal, scores, jnp.asarray(-jnp.inf, scores.dtype))
    weights = jax.nn.softmax(scores, axis=-1)
    mixed = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(batch, length, d_model)
    return _affine(p["attention_out"], mixed)


def hidden_states(params: Params, tokens: jax.Array, *, num_heads: int) -> jax.Array:
    """The final layer's normalised states ``[B, T, d]`` for integer ``tokens [B, T]``: the
    input of the classifier.

    >>> params = init(jax.random.key(0), vocab_size=50, d_model=8, num_layers=1, max_len=16)
    >>> hidden_states(params, jnp.zeros((2, 5), jnp.int32), num_heads=2).shape
    (2, 5, 8)
    """
    d_model = params["embedding"].shape[1]
    if d_model % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the width d_model={d_model}.")
    length = tokens.shape[-1]
    if length > params["position"].shape[0]:
        raise ValueError(
            f"the sequence has {length} tokens, more than the {params['position'].shape[0]} "
            "positions the parameters were made for (max_len)."
        )
    h = params["embedding"][tokens] + _lead(params["position"][:length], tokens.ndim + 1)
    for layer in params["layers"]:
        h = h + causal_self_attention(layer, layer_norm(layer["attention_norm"], h), num_heads)
        inner = jax.nn.gelu(_affine(layer["mlp_in"], layer_norm(layer["mlp_norm"], h)))
        h = h + _affine(layer["mlp_out"], inner)
    return layer_norm(params["final_norm"], h)


def classifier(params: Params) -> jax.Array:
    """The output classifier ``[V, d]``: the embedding table when tied."""
    return params.get("classifier", params["embedding"])


def logits(params: Params, tokens: jax.Array, *, num_heads: int) -> jax.Array:
    """``hidden_states @ classifier.T``: ``[B, T, V]``, the next token's scores at each
    position."""
    return hidden_states(params, tokens, num_heads=num_heads) @ classifier(params).T

"""What ``gradient_filter`` saves and what it costs, measured on the logits of the language model
that ``experiments/language_model.py`` trained: the library of ``gradient_filter.py`` and of the
benchmark's case 4 (``benchmark.py``)."""

from __future__ import annotations

import json

import harness  # helper modules of the scripts
import jax
import jax.numpy as jnp
import lm_training
import numpy as np
import text_corpus
import transformer

from jaxsoftmax import linear_cross_entropy

DEFAULT_RUN = lm_training.DEFAULT_RUN  # where language_model.py writes the model
EPSILONS = (1e-6, 1e-4, 1e-2)


def trained_model(run: str):
    """``(config, params, corpus)`` of the language model whose checkpoint is in ``run``."""
    path = lm_training.trained_checkpoint(run)
    with np.load(path, allow_pickle=False) as stored:
        saved = json.loads(str(stored["config"]))
    config = lm_training.LMConfig(**saved)
    corpus = text_corpus.load(
        config.vocab_size,
        validation_fraction=config.validation_fraction,
        max_files=config.max_files,
        on_progress=None,
    )
    return config, lm_training.load_params(path, config, corpus.vocab_size), corpus


def hidden_and_labels(config, params, corpus, num_tokens: int):
    """Final hidden states ``[N, d]`` and next-token labels ``[N]`` of validation windows."""
    windows = num_tokens // config.seq_len
    tokens = corpus.validation_tokens
    starts = np.linspace(0, tokens.size - config.seq_len - 1, windows).astype(np.int64)
    batch = jnp.asarray(tokens[starts[:, None] + np.arange(config.seq_len + 1)])
    hidden = jax.jit(transformer.hidden_states, static_argnames="num_heads")(
        params, batch[:, :-1], num_heads=config.num_heads
    )
    return hidden.reshape(-1, hidden.shape[-1]), batch[:, 1:].reshape(-1)


def skipped_share(hidden, classifier, labels, eps: float, token_chunk: int, vocab_chunk: int):
    """The share of ``[token_chunk, vocab_chunk]`` tiles whose softmax is below ``eps``
    everywhere and that hold no label: what the filter skips (the plain loss's criterion)."""
    z = np.asarray(hidden @ classifier.T, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(p.shape[0]), np.asarray(labels)] = 1.0  # a label makes its tile count
    n, v = p.shape
    rows, cols = -(-n // token_chunk), -(-v // vocab_chunk)
    padded = np.zeros((rows * token_chunk, cols * vocab_chunk))
    padded[:n, :v] = p
    tiles = padded.reshape(rows, token_chunk, cols, vocab_chunk).max(axis=(1, 3))
    return float(np.mean(tiles <= eps))


TILES = ((1024, 1024), (256, 512))  # the CPU's default tile, and a smaller one


def measure(
    run: str = DEFAULT_RUN, num_tokens: int = 8192, repeats: int = 6, epsilons=EPSILONS,
    tiles=TILES,
):  # fmt: skip
    """Rows of ``{tile, eps, seconds, time_ratio, relative_error_hidden, ...}``."""
    config, params, corpus = trained_model(run)
    hidden, labels = hidden_and_labels(config, params, corpus, num_tokens)
    classifier = transformer.classifier(params)
    rows = []
    for token_chunk, vocab_chunk in tiles:
        chunks = dict(token_chunk=token_chunk, vocab_chunk=vocab_chunk)
        rows += measure_tile(config, hidden, classifier, labels, chunks, repeats, epsilons)
    shape = dict(n=int(hidden.shape[0]), d=int(hidden.shape[1]), v=int(classifier.shape[0]))
    return dict(shape=shape, steps_trained=config.steps, rows=rows)


def measure_tile(config, hidden, classifier, labels, chunks, repeats, epsilons):
    def gradient(eps):
        loss = lambda h, w: linear_cross_entropy(
            h, w, labels, z_loss=config.z_loss, gradient_filter=eps, method="recompute", **chunks
        )
        return jax.jit(jax.value_and_grad(loss, (0, 1)))

    functions = {"exact": gradient(None)} | {f"eps={e:g}": gradient(e) for e in epsilons}
    outputs = {name: f(hidden, classifier) for name, f in functions.items()}
    seconds = harness.time_interleaved(
        {name: (lambda f=f: f(hidden, classifier)) for name, f in functions.items()}, repeats
    )
    _, (exact_hidden, exact_classifier) = outputs["exact"]
    relative = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    rows = []
    for eps in epsilons:
        name = f"eps={eps:g}"
        _, (d_hidden, d_classifier) = outputs[name]
        rows.append(
            dict(
                tile=f"{chunks['token_chunk']}x{chunks['vocab_chunk']}",
                eps=eps,
                seconds=seconds[name],
                exact_seconds=seconds["exact"],
                time_ratio=seconds[name] / seconds["exact"],
                relative_error_hidden=relative(d_hidden, exact_hidden),
                relative_error_classifier=relative(d_classifier, exact_classifier),
                skipped_tiles=skipped_share(hidden, classifier, labels, eps, **chunks),
            )
        )
    return rows

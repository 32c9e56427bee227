"""What ``gradient_filter`` saves and what it costs, on a trained language model's logits.

``linear_cross_entropy(..., gradient_filter=eps)`` skips the backward's matrix products for
tiles whose gradient entries are all negligible (softmax below ``eps`` and no label). How
many tiles that is depends on how concentrated the softmax is, so random logits say nothing:
this script loads the model ``experiments/language_model.py`` trained (its checkpoint),
computes its final hidden states on validation windows, and for each ``eps`` measures the
loss + gradient time against the exact gradient (interleaved rounds, one process) and the
relative error ``||g_eps - g|| / ||g||`` of the gradients for the hidden states and the
classifier, with the share of tiles the criterion skips.

Usage::

  python experiments/language_model.py          # trains the model (about five minutes)
  python experiments/gradient_filter.py         # then this; writes experiments/results/gradient_filter/

Results are written atomically to ``--out`` (``results.json``, ``results.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_training  # siblings
import text_corpus
import transformer
from flag_types import positive_int

from jaxsoftmax import linear_cross_entropy, training

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RUN = os.path.join(HERE, "results", "language_model")
EPSILONS = (1e-6, 1e-4, 1e-2)


def trained_model(run: str):
    """``(config, params, corpus)`` of the language model whose checkpoint is in ``run``."""
    path = os.path.join(run, lm_training.CHECKPOINT_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no trained language model at {path}: run python experiments/language_model.py "
            f"--out {run} first (about five minutes on 2 CPU cores)."
        )
    with np.load(path, allow_pickle=False) as stored:
        saved = json.loads(str(stored["config"]))
    config = lm_training.LMConfig(**saved)
    corpus = text_corpus.load(
        config.vocab_size,
        validation_fraction=config.validation_fraction,
        max_files=config.max_files,
        on_progress=None,
    )
    optimizer = lm_training.make_optimizer(config)
    params = jax.eval_shape(lambda: lm_training.init_params(config, corpus.vocab_size))
    template = training.TrainState(params, jax.eval_shape(optimizer.init, params), 0)
    state, _ = lm_training.load_checkpoint(path, template)
    return config, state.params, corpus


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
        rows += _measure_tile(config, hidden, classifier, labels, chunks, repeats, epsilons)
    shape = dict(n=int(hidden.shape[0]), d=int(hidden.shape[1]), v=int(classifier.shape[0]))
    return dict(shape=shape, steps_trained=config.steps, rows=rows)


def _measure_tile(config, hidden, classifier, labels, chunks, repeats, epsilons):
    import benchmark  # a sibling: its interleaved timing

    def gradient(eps):
        loss = lambda h, w: linear_cross_entropy(
            h, w, labels, z_loss=config.z_loss, gradient_filter=eps, method="recompute", **chunks
        )
        return jax.jit(jax.value_and_grad(loss, (0, 1)))

    functions = {"exact": gradient(None)} | {f"eps={e:g}": gradient(e) for e in epsilons}
    outputs = {name: f(hidden, classifier) for name, f in functions.items()}
    seconds = benchmark.time_interleaved(
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


def write(out: str, result: dict) -> None:
    os.makedirs(out, exist_ok=True)
    training.write_atomically(os.path.join(out, "results.json"), json.dumps(result, indent=1))
    s = result["shape"]
    lines = [
        "# Gradient filtering on a trained language model's logits",
        "",
        f"`linear_cross_entropy(..., gradient_filter=eps)`, loss + gradients for the hidden "
        f"states and the classifier, N = {s['n']} validation tokens, d = {s['d']}, "
        f"V = {s['v']}; the model of experiments/language_model.py after "
        f"{result['steps_trained']} steps. Times are medians of interleaved rounds in one "
        "process. Reproduce: `python experiments/gradient_filter.py`.",
        "",
        "| tile (tokens x classes) | eps | tiles skipped | time / exact | exact ms | "
        "relative error dL/dh | relative error dL/dW |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tile']} | {r['eps']:g} | {r['skipped_tiles']:.1%} | {r['time_ratio']:.2f} | "
            f"{r['exact_seconds'] * 1e3:.0f} | {r['relative_error_hidden']:.2e} | "
            f"{r['relative_error_classifier']:.2e} |"
        )
    training.write_atomically(os.path.join(out, "results.md"), "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--run", default=DEFAULT_RUN, help="the language model's output folder")
    parser.add_argument("--tokens", type=positive_int, default=8192, help="validation tokens")
    parser.add_argument("--repeats", type=positive_int, default=6, help="timed rounds")
    parser.add_argument(
        "--out", default=os.path.join(HERE, "results", "gradient_filter"), help="output folder"
    )
    arguments = parser.parse_args(argv)
    try:
        result = measure(arguments.run, arguments.tokens, arguments.repeats)
    except FileNotFoundError as error:
        parser.error(f"argument --run: {error}")
    write(arguments.out, result)
    for r in result["rows"]:
        print(
            f"tile {r['tile']}, eps {r['eps']:g}: {r['skipped_tiles']:.1%} of tiles skipped, time "
            f"{r['time_ratio']:.2f} of exact, relative error dh {r['relative_error_hidden']:.1e}"
            f", dW {r['relative_error_classifier']:.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

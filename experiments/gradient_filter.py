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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import positive_int  # helper modules of the scripts
from filter_measurement import DEFAULT_RUN, measure

from jaxsoftmax import training

HERE = os.path.dirname(os.path.abspath(__file__))


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

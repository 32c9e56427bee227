"""What the scripts that tune the trained language model share (``reinforce.py``,
``preference.py``): reading their inputs, and the table of their two updates side by side.

Not a script: a module they import.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import common
import lm_training
import text_corpus


def load_inputs(parser: argparse.ArgumentParser, arguments: argparse.Namespace,
                make_config: Callable) -> tuple:  # fmt: skip
    """``(config, corpus, checkpoint)`` (:func:`common.checkpoint_to_resume`) of a run that
    tunes the model trained into ``--model``: ``make_config(model=, model_fingerprint=)`` is
    the run's config. Flags that contradict each other and a missing or foreign model are
    usage errors (exit status 2), found before any work, reported under the flag's name."""
    try:
        model, model_corpus, fingerprint = lm_training.read_trained(arguments.model, "the model")
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"argument --model: {error}")
    try:
        config = make_config(model=model, model_fingerprint=fingerprint)
    except ValueError as error:
        parser.error(common.name_the_flag(str(error), arguments))
    common.check_output_directory(parser, arguments.out)
    checkpoint = common.checkpoint_to_resume(
        parser, arguments, lambda path: lm_training.check_checkpoint(path, config, model_corpus)
    )
    corpus = text_corpus.load(
        model.vocab_size,
        validation_fraction=model.validation_fraction,
        max_files=model.max_files,
        cache_directory=arguments.corpus_cache,
    )
    if corpus.fingerprint != model_corpus:
        parser.error(
            f"argument --model: the model in {arguments.model} was trained on other tokens "
            "(another Python's standard library, or another tokenizer); train it again here"
        )
    return config, corpus, checkpoint


def comparison_lines(comparison: dict, description: str) -> list[str]:
    """The two updates' compiled temporary memory and seconds per update, a row each, a
    column per loss (``naive``, ``fused``) and their ratio, under ``description`` (the
    batch's shape in words)."""
    naive, fused = comparison["naive"], comparison["fused"]
    rows = [
        ("update's temporary memory (compiled)", "step_temp_bytes",
         lambda v: f"{v / 2**20:,.1f} MiB"),
        (f"seconds per update (median of {comparison['rounds']})", "seconds_per_update",
         "{:.3f} s".format),
    ]  # fmt: skip
    lines = [description, f"{'':40} {'naive':>12} {'fused':>12}   fused / naive"]
    for label, key, show in rows:
        ratio = fused[key] / naive[key] if naive[key] else float("nan")
        lines.append(f"{label:40} {show(naive[key]):>12} {show(fused[key]):>12}   {ratio:.3f}")
    return lines

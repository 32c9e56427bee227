"""What the scripts that tune the trained language model share (``reinforce.py``,
``preference.py``): their command line, reading their inputs, and the table of their two
updates side by side.

Not a script: a module they import.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import common
import harness
import lm_training
import text_corpus
from common import non_negative_int, positive_int

# The last flags of both scripts, (config field, type, help): how often they evaluate and save.
SCHEDULE_FLAGS = (
    ("eval_every", positive_int, "steps between held-out evaluations, one history row each"),
    (
        "checkpoint_every",
        non_negative_int,
        "steps between checkpoints, a multiple of --eval-every; 0: none",
    ),
)


def build_parser(doc: str, config_class, flags: tuple, model_help: str,
                 default_out: str) -> argparse.ArgumentParser:  # fmt: skip
    """The script's parser: ``--model``, a flag per ``flags`` entry (field, type, help) with
    ``config_class``'s default, the comparison's rounds, the corpus cache and the outputs."""
    parser = common.script_parser(doc)
    parser.add_argument(
        "--model",
        default=lm_training.DEFAULT_RUN,
        help="folder of the trained language model (its checkpoint.npz), the output of "
        f"python experiments/language_model.py{model_help}",
    )
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(config_class)
        if field.default is not dataclasses.MISSING
    }
    common.add_field_flags(parser, defaults, flags)
    parser.add_argument(
        "--compare-rounds",
        type=non_negative_int,
        default=5,
        help="before training, time this many updates of each loss side by side (and compare "
        "their memory); 0: no comparison",
    )
    parser.add_argument(
        "--corpus-cache",
        default=text_corpus.default_cache_directory(),
        help="folder of the cached tokenizer and token streams (shared with language_model.py)",
    )
    common.add_output_flags(parser, default_out, "output directory", "the two .png plots")
    return parser


def load_inputs(parser: argparse.ArgumentParser, arguments: argparse.Namespace, config_class,
                flags: tuple) -> tuple:  # fmt: skip
    """``(config, corpus, checkpoint)`` (:func:`common.checkpoint_to_resume`) of a run that
    tunes the model trained into ``--model``: the run's config is ``config_class`` of that
    model and the fields ``flags`` set. Flags that contradict each other and a missing or foreign model are
    usage errors (exit status 2), found before any work, reported under the flag's name."""
    try:
        model, model_corpus, fingerprint = lm_training.read_trained(arguments.model, "the model")
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"argument --model: {error}")
    try:
        config = config_class(
            model=model, model_fingerprint=fingerprint, **common.fields_of(arguments, flags)
        )
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


def run_description(arguments: argparse.Namespace, argv, script: str, params, corpus,
                    config) -> dict:  # fmt: skip
    """What ``metrics.json`` says of the run besides its results: the tuned model's checkpoint
    and size, the command, the device, the libraries' versions, the corpus and the config."""
    return {
        "model": {
            "checkpoint": os.path.relpath(
                lm_training.trained_checkpoint(arguments.model, "the model")
            ),
            "parameters": common.parameter_count(params),
        },
        "command": harness.command(script, argv),
        "device": common.device_description(),
        "versions": common.library_versions(("tokenizers",)),
        "corpus": corpus.describe(),
        "config": config.to_dict(),
    }

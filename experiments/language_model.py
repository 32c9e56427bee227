"""Train a small transformer language model on the Python standard library's own sources.

The text is every ``.py`` file of the standard library of the Python that runs the script
(no download), split by files into training and validation, tokenized with a byte-pair
encoding of 16384 tokens trained on the training files (``text_corpus.py``). The model is a
decoder-only transformer written as pure functions (``transformer.py``); its next-token loss
is ``jaxsoftmax.linear_cross_entropy`` with z-loss, the accuracy, z-loss and entropy coming
from the same pass (``return_aux=True``). ``--loss naive`` trains the same model through the
``[tokens, vocabulary]`` logits and ``jaxsoftmax.cross_entropy`` instead.

    python experiments/language_model.py                      # about 5 minutes on 2 CPU cores
    python experiments/language_model.py --loss naive --out runs/language_model_naive
    python experiments/language_model.py --d-model 512 --num-layers 8 --num-heads 8 \\
        --seq-len 512 --batch-size 64 --steps 5000 --out runs/lm_gpu   # for a GPU

Before training, the script runs ``--compare-steps`` steps with each loss in a process of its
own and reports, side by side, the compiled training step's temporary memory, the process's
peak memory and the tokens per second. Training runs data-parallel over ``--devices``;
``--vocab-shards S`` also splits the classifier's vocabulary over S of them
(``jaxsoftmax.sharded_linear_cross_entropy``).

Writes into ``--out``: metrics.json, history.csv, loss.png, accuracy.png, the comparison's
runs under comparison/, and checkpoint.npz (``--resume`` continues from it). The tokenizer and
the token streams are cached in ``--corpus-cache``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import subprocess
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
import lm_training  # helper modules of the scripts
import text_corpus
from common import (
    fraction,
    non_negative_float,
    non_negative_int,
    number,
    positive_float,
    positive_int,
)

from jaxsoftmax import training

SCRIPT = os.path.abspath(__file__)
OUTPUTS_WRITTEN_ATOMICALLY = ("metrics.json", "history.csv", "loss.png", "accuracy.png")
SPLITS = ("train", "validation")
vocabulary_size = number(int, lambda v: v >= 257, "an integer >= 257 (256 bytes and one more)")


# The flags that set a field of lm_training.LMConfig, its default theirs: (field, type, help),
# or a flag several scripts share (common.SHARED_FLAGS); --classifier sets ``tied``.
FLAGS = (
    ("vocab_size", vocabulary_size, "tokens of the byte-pair encoding (the classifier's classes)"),
    (
        "max_files",
        positive_int,
        "use only the first N files of the standard library, in sorted order; None: all",
    ),
    ("validation_fraction", fraction, "share of the files held out for validation"),
    ("d_model", positive_int, "width of the model"),
    ("num_layers", positive_int, "transformer blocks"),
    ("num_heads", positive_int, "attention heads; must divide --d-model"),
    ("d_ff", positive_int, "hidden width of the MLPs; None: 4 x d"),
    ("seq_len", positive_int, "tokens per window"),
    ("batch_size", positive_int, "windows per step"),
)
TRAINING_FLAGS = (
    (
        "loss",
        lm_training.LOSSES,
        "fused: linear_cross_entropy, no logits array; naive: logits, then cross_entropy",
    ),
    *("z_loss", "learning_rate", "warmup_steps"),
    ("weight_decay", non_negative_float, "AdamW's decoupled weight decay of the matrices"),
    ("clip_norm", positive_float, "gradients clipped to this global norm"),
    *("steps", "seed", "eval_every"),
    (
        "eval_batches",
        positive_int,
        "each evaluation reads this many batches of fixed windows of each split",
    ),
    *("checkpoint_every", "devices"),
    (
        "vocab_shards",
        positive_int,
        "split the classifier's vocabulary over this many of the devices "
        "(sharded_linear_cross_entropy); must divide the device count",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    defaults = lm_training.LMConfig()
    parser = common.script_parser(__doc__)
    common.add_field_flags(parser, defaults, FLAGS)
    parser.add_argument(
        "--classifier",
        choices=("tied", "untied"),
        default="tied",
        help="tied: the classifier is the embedding table; untied: a matrix of its own",
    )
    common.add_field_flags(parser, defaults, TRAINING_FLAGS)
    parser.add_argument(
        "--compare-steps",
        type=non_negative_int,
        default=20,
        help="before training, run this many steps of each loss in a process of its own and "
        "compare their memory and speed (tokens/s over the second half); 0: no comparison",
    )
    parser.add_argument(
        "--corpus-cache",
        default=text_corpus.default_cache_directory(),
        help="folder of the cached tokenizer and token streams",
    )
    common.add_output_flags(
        parser,
        lm_training.DEFAULT_RUN,
        "output directory (distill.py and gradient_filter.py read the model from here)",
        "loss.png and accuracy.png",
    )
    return parser


def config_from_arguments(arguments: argparse.Namespace) -> lm_training.LMConfig:
    return lm_training.LMConfig(
        **common.fields_of(arguments, FLAGS),
        tied=arguments.classifier == "tied",
        **common.fields_of(arguments, TRAINING_FLAGS),
    )


def flags_of(config: lm_training.LMConfig) -> list[str]:
    """The command-line flags that give ``config`` (the inverse of
    :func:`config_from_arguments`)."""
    flags = []
    for name, value in config.to_dict().items():
        if value is None:
            continue
        if name == "tied":
            flags += ["--classifier", "tied" if value else "untied"]
        else:
            flags += [common.flag_of(name), str(value)]
    return flags


# ---------------------------------------------------------------------------------------------
# The side-by-side comparison of the two losses


def compare_losses(config, arguments, steps: int, folder: str) -> dict:
    """Runs ``steps`` steps of ``config`` with each loss, each in a fresh process (so that
    each peak memory is its own), and returns their measurements. The tokens per second are
    those of the second half of the steps, the first half warming up (a fresh process's first
    steps also fault in its memory). A loss's run already in ``folder`` with the same settings
    is read back instead of run again."""
    warm_up = steps // 2
    results = {}
    for loss in ("naive", "fused"):
        child = lm_training.LMConfig(
            **{
                **config.to_dict(),
                "loss": loss,
                "vocab_shards": config.vocab_shards if loss == "fused" else 1,
                "steps": steps,
                "eval_every": max(warm_up, 1),
                "checkpoint_every": 0,
                "eval_batches": 1,
            }
        )
        out = os.path.join(folder, loss)
        metrics_path = os.path.join(out, "metrics.json")
        metrics = None
        if os.path.exists(metrics_path):
            with open(metrics_path, encoding="utf-8") as file:
                metrics = json.load(file)
            if metrics.get("config") != child.to_dict():
                metrics = None
        if metrics is None:
            command = [
                sys.executable,
                SCRIPT,
                *flags_of(child),
                "--out",
                out,
                "--corpus-cache",
                arguments.corpus_cache,
                "--compare-steps",
                "0",
                "--no-plots",
                "--no-progress",
            ]
            if arguments.no_compilation_cache:
                command.append("--no-compilation-cache")
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                raise RuntimeError(
                    f"the comparison's {loss} run failed (exit {completed.returncode}):\n"
                    f"{completed.stdout}{completed.stderr}"
                )
            with open(metrics_path, encoding="utf-8") as file:
                metrics = json.load(file)
        with open(os.path.join(out, "history.csv"), newline="", encoding="utf-8") as file:
            last_row = list(csv.DictReader(file))[-1]
        results[loss] = {
            "step_temp_bytes": metrics["step_temp_bytes"],
            "peak_memory_bytes": metrics["peak_memory_bytes"],
            "tokens_per_second": float(last_row["tokens_per_second"]),
            "validation_loss": metrics["validation_loss"],
            "devices": metrics["devices"],
        }
    return {"steps": steps, "timed_steps": steps - warm_up if warm_up else steps, **results}


def comparison_table(comparison: dict) -> str:
    """The comparison as lines of text, one row per measurement, a column per loss."""
    naive, fused = comparison["naive"], comparison["fused"]
    rows = [
        ("training step's temporary memory (compiled)", "step_temp_bytes", _mib),
        ("process peak memory (resident)", "peak_memory_bytes", _mib),
        (
            f"tokens per second (last {comparison['timed_steps']} steps)",
            "tokens_per_second",
            lambda v: f"{v:,.0f}",
        ),
        (f"validation loss after {comparison['steps']} steps", "validation_loss", "{:.5f}".format),
    ]
    lines = [f"{'':46} {'naive':>12} {'fused':>12}   fused / naive"]
    for label, key, show in rows:
        ratio = fused[key] / naive[key] if naive[key] else float("nan")
        lines.append(f"{label:46} {show(naive[key]):>12} {show(fused[key]):>12}   {ratio:.3f}")
    return "\n".join(lines)


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Outputs


def plot_curves(folder: str, history: list[dict], baselines: dict[str, float], title: str):
    """loss.png (beside the ``baselines``) and accuracy.png of both splits against the tokens
    trained on."""
    plt = common.pyplot()
    tokens = [row["tokens"] / 1e6 for row in history]
    references = [
        (f"{label} ({value:.2f})", value, style)
        for (label, value), style in zip(baselines.items(), (":", "--"))
    ]
    for metric, filename, settings in (
        ("loss", "loss.png", dict(ylabel="cross-entropy (nats per token)")),
        ("accuracy", "accuracy.png", dict(ylabel="next-token accuracy (argmax)", ylim=(0, None))),
    ):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        lines = {split: [row[f"{split}_{metric}"] for row in history] for split in SPLITS}
        common.plot_lines(
            axes,
            tokens,
            lines,
            references if metric == "loss" else (),
            xlabel="training tokens (millions)",
            title=title,
            **settings,
        )
        common.write_figure(figure, os.path.join(folder, filename))


def load_inputs(parser: argparse.ArgumentParser, arguments: argparse.Namespace):
    """``(config, corpus, checkpoint)`` (:func:`common.checkpoint_to_resume`) of the run the
    flags ask for. Flags that contradict each other are usage errors (exit status 2), found
    before any work, reported under the flag's name."""
    try:
        training.select_devices(arguments.devices)
    except ValueError as error:
        parser.error(f"argument --devices: {error}")
    try:
        config = config_from_arguments(arguments)
        lm_training.make_mesh(config)
    except ValueError as error:
        parser.error(common.name_the_flag(str(error), arguments))
    common.check_output_directory(parser, arguments.out)
    try:
        corpus = text_corpus.load(
            config.vocab_size,
            validation_fraction=config.validation_fraction,
            max_files=config.max_files,
            cache_directory=arguments.corpus_cache,
        )
    except ValueError as error:
        parser.error(f"argument --max-files: {error}")
    try:
        lm_training.check_config_for_corpus(config, corpus)
    except ValueError as error:
        parser.error(common.name_the_flag(str(error), arguments))
    checkpoint = common.checkpoint_to_resume(
        parser,
        arguments,
        lambda path: lm_training.check_checkpoint(path, config, corpus.fingerprint),
    )
    return config, corpus, checkpoint


def unigram_baselines(corpus) -> dict[str, float]:
    """What a model that ignores the context reaches: the entropy of the training tokens'
    frequencies, and the validation loss of a model predicting them."""
    return {
        "unigram entropy, training tokens": text_corpus.unigram_entropy(
            corpus.train_tokens, corpus.vocab_size
        ),
        "unigram model, validation": text_corpus.unigram_cross_entropy(
            corpus.train_tokens, corpus.validation_tokens, corpus.vocab_size
        ),
    }


def describe_corpus(corpus, baselines: dict[str, float]) -> None:
    described = corpus.describe()
    print(
        f"corpus: {corpus.source}; {described['train_tokens']:,} training tokens in "
        f"{corpus.train_files} files, {described['validation_tokens']:,} validation tokens in "
        f"{corpus.validation_files} files, vocabulary {corpus.vocab_size}"
    )
    entropy, unigram_validation = baselines.values()
    print(
        f"unigram entropy of the training tokens: {entropy:.3f} nats per token; a unigram "
        f"model's validation loss: {unigram_validation:.3f}"
    )


def metrics(result, config, corpus, baselines: dict[str, float], comparison) -> dict:
    """metrics.json of a run."""
    final = result.history[-1]
    entropy, unigram_validation = baselines.values()
    return {
        "validation_loss": final["validation_loss"],
        "train_loss": final["train_loss"],
        "unigram_entropy": entropy,
        "unigram_entropy_note": "-sum p log p of the training tokens' frequencies, nats",
        "unigram_model_validation_loss": unigram_validation,
        "validation_accuracy": final["validation_accuracy"],
        "train_accuracy": final["train_accuracy"],
        "validation_entropy": final["validation_entropy"],
        "validation_z_loss": final["validation_z_loss"],
        "losses_note": "cross-entropy in nats per token without the z-loss term, on "
        f"{config.eval_batches * config.batch_size} fixed windows of {config.seq_len} tokens "
        "of each split",
        "loss": config.loss,
        "tokens_per_second": result.tokens_per_second,
        "step_temp_bytes": result.step_temp_bytes,
        "peak_memory_bytes": result.peak_memory_bytes,
        "comparison": comparison,
        "steps": result.steps,
        "tokens_trained": final["tokens"],
        "parameters": common.parameter_count(result.params),
        "train_seconds": result.train_seconds,
        "train_seconds_note": common.seconds_note(
            "wall time of lm_training.train in this process, compilation and evaluation included",
            result.resumed_from,
        ),
        "device": common.device_description(),
        "devices": result.devices,
        "versions": common.library_versions(("tokenizers",)),
        "corpus": corpus.describe(),
        "config": config.to_dict(),
    }


def outcome(result, entropy: float) -> str:
    """The line on the trained model and the steps this run took."""
    final = result.history[-1]
    ran = common.steps_ran(result.steps, result.resumed_from)
    return (
        f"validation loss {final['validation_loss']:.4f} (unigram entropy {entropy:.4f}), "
        f"validation accuracy {final['validation_accuracy']:.4f}, "
        f"{result.tokens_per_second:,.0f} tokens/s, {ran} in {result.train_seconds:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = common.parse_flags(parser, argv)
    config, corpus, checkpoint = load_inputs(parser, arguments)
    print(f"device: {common.device_description()} ({jax.device_count()} visible)")
    baselines = unigram_baselines(corpus)
    describe_corpus(corpus, baselines)
    common.start_output(arguments, OUTPUTS_WRITTEN_ATOMICALLY, checkpoint)
    comparison = None
    if arguments.compare_steps:
        print(
            f"comparing the losses: {arguments.compare_steps} steps of each, each in a "
            "process of its own"
        )
        folder = os.path.join(arguments.out, "comparison")
        try:
            comparison = compare_losses(config, arguments, arguments.compare_steps, folder)
        except RuntimeError as error:
            print(f"stopped: {error}", file=sys.stderr)
            return 1
        print(comparison_table(comparison))
    result = common.train_with_progress(
        functools.partial(lm_training.train, config, corpus),
        arguments,
        config.steps,
        lambda row: {
            "loss": f"{row['batch_loss']:.3f}",
            "val": f"{row['validation_loss']:.3f}",
            "tok_s": f"{row['tokens_per_second']:,.0f}",
        },
        initial=checkpoint[1] or 0,
    )
    if result is None:  # stopped on a non-finite value
        return 2
    found = metrics(result, config, corpus, baselines, comparison)
    common.write_json(os.path.join(arguments.out, "metrics.json"), found)
    common.write_history(os.path.join(arguments.out, "history.csv"), result.history)
    written = ["metrics.json", "history.csv"]
    if config.checkpoint_every:
        written.append(training.CHECKPOINT_FILENAME)
    if not arguments.no_plots:
        title = (
            f"{config.num_layers} layers, d = {config.d_model}, V = {corpus.vocab_size}, "
            f"{config.loss} loss"
        )
        plot_curves(arguments.out, result.history, baselines, title)
        written += ["loss.png", "accuracy.png"]
    print(outcome(result, found["unigram_entropy"]))
    common.report_written(arguments.out, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())

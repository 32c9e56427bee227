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
import json
import os
import subprocess
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
import lm_training  # helper modules of the scripts
import text_corpus
from common import non_negative_float, non_negative_int, number, positive_float, positive_int

from jaxsoftmax import training

SCRIPT = os.path.abspath(__file__)
OUTPUTS_WRITTEN_ATOMICALLY = ("metrics.json", "history.csv", "loss.png", "accuracy.png")
fraction = number(float, lambda v: 0 < v < 1, "a number in (0, 1)")
vocabulary_size = number(int, lambda v: v >= 257, "an integer >= 257 (256 bytes and one more)")


def build_parser() -> argparse.ArgumentParser:
    defaults = lm_training.LMConfig()
    parser = common.OneLineErrorParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--vocab-size",
        type=vocabulary_size,
        default=defaults.vocab_size,
        help="tokens of the byte-pair encoding (the classifier's classes)",
    )
    parser.add_argument(
        "--max-files",
        type=positive_int,
        default=None,
        help="use only the first N files of the standard library, in sorted order; None: all",
    )
    parser.add_argument(
        "--validation-fraction",
        type=fraction,
        default=defaults.validation_fraction,
        help="share of the files held out for validation",
    )
    parser.add_argument(
        "--d-model", type=positive_int, default=defaults.d_model, help="width of the model"
    )
    parser.add_argument(
        "--num-layers",
        type=positive_int,
        default=defaults.num_layers,
        help="transformer blocks",
    )
    parser.add_argument(
        "--num-heads",
        type=positive_int,
        default=defaults.num_heads,
        help="attention heads; must divide --d-model",
    )
    parser.add_argument(
        "--d-ff",
        type=positive_int,
        default=None,
        help="hidden width of the MLPs; None: 4 x d",
    )
    parser.add_argument(
        "--seq-len", type=positive_int, default=defaults.seq_len, help="tokens per window"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=defaults.batch_size,
        help="windows per step",
    )
    parser.add_argument(
        "--classifier",
        choices=("tied", "untied"),
        default="tied",
        help="tied: the classifier is the embedding table; untied: a matrix of its own",
    )
    parser.add_argument(
        "--loss",
        choices=lm_training.LOSSES,
        default=defaults.loss,
        help="fused: linear_cross_entropy, no logits array; naive: logits, then cross_entropy",
    )
    parser.add_argument(
        "--z-loss",
        type=non_negative_float,
        default=defaults.z_loss,
        help="z-loss weight, >= 0",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=defaults.learning_rate,
        help="peak learning rate of AdamW, reached after --warmup-steps, cosine decay after",
    )
    parser.add_argument(
        "--warmup-steps",
        type=non_negative_int,
        default=defaults.warmup_steps,
        help="steps of linear warm-up",
    )
    parser.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=defaults.weight_decay,
        help="AdamW's decoupled weight decay of the matrices",
    )
    parser.add_argument(
        "--clip-norm",
        type=positive_float,
        default=defaults.clip_norm,
        help="gradients clipped to this global norm",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=defaults.steps, help="optimizer steps"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the initialisation and batches"
    )
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        default=defaults.eval_every,
        help="steps between evaluations on both splits, one history row each",
    )
    parser.add_argument(
        "--eval-batches",
        type=positive_int,
        default=defaults.eval_batches,
        help="each evaluation reads this many batches of fixed windows of each split",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=defaults.checkpoint_every,
        help="steps between checkpoints, a multiple of --eval-every; 0: none",
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        help="run on the first N local devices, the batch split over them; None: all",
    )
    parser.add_argument(
        "--vocab-shards",
        type=positive_int,
        default=defaults.vocab_shards,
        help="split the classifier's vocabulary over this many of the devices "
        "(sharded_linear_cross_entropy); must divide the device count",
    )
    parser.add_argument(
        "--compare-steps",
        type=non_negative_int,
        default=20,
        help="before training, run this many steps of each loss in a process of its own and "
        "compare their memory and speed (tokens/s over the second half); 0: no comparison",
    )
    parser.add_argument(
        "--out",
        default=lm_training.DEFAULT_RUN,
        help="output directory (distill.py and gradient_filter.py read the model from here)",
    )
    parser.add_argument(
        "--corpus-cache",
        default=text_corpus.default_cache_directory(),
        help="folder of the cached tokenizer and token streams",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    parser.add_argument("--no-plots", action="store_true", help="skip loss.png and accuracy.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_cache_flag(parser)
    return parser


def config_from_arguments(arguments: argparse.Namespace) -> lm_training.LMConfig:
    return lm_training.LMConfig(
        vocab_size=arguments.vocab_size,
        max_files=arguments.max_files,
        validation_fraction=arguments.validation_fraction,
        d_model=arguments.d_model,
        num_layers=arguments.num_layers,
        num_heads=arguments.num_heads,
        d_ff=arguments.d_ff,
        seq_len=arguments.seq_len,
        batch_size=arguments.batch_size,
        tied=arguments.classifier == "tied",
        loss=arguments.loss,
        z_loss=arguments.z_loss,
        learning_rate=arguments.lr,
        warmup_steps=arguments.warmup_steps,
        weight_decay=arguments.weight_decay,
        clip_norm=arguments.clip_norm,
        steps=arguments.steps,
        seed=arguments.seed,
        eval_every=arguments.eval_every,
        eval_batches=arguments.eval_batches,
        checkpoint_every=arguments.checkpoint_every,
        devices=arguments.devices,
        vocab_shards=arguments.vocab_shards,
    )


def flags_of(config: lm_training.LMConfig) -> list[str]:
    """The command-line flags that give ``config`` (the inverse of
    :func:`config_from_arguments`)."""
    renamed = {"learning_rate": "--lr", "tied": "--classifier"}
    flags = []
    for name, value in config.to_dict().items():
        if value is None:
            continue
        if name == "tied":
            value = "tied" if value else "untied"
        flags += [renamed.get(name, "--" + name.replace("_", "-")), str(value)]
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
    plt = common.pyplot()
    tokens = [row["tokens"] / 1e6 for row in history]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(tokens, [row["train_loss"] for row in history], label="train")
    axes.plot(tokens, [row["validation_loss"] for row in history], label="validation")
    for (label, value), style in zip(baselines.items(), (":", "--")):
        axes.axhline(value, color="grey", linestyle=style, label=f"{label} ({value:.2f})")
    axes.set(xlabel="training tokens (millions)", ylabel="cross-entropy (nats per token)")
    axes.set(title=title)
    axes.legend()
    figure.tight_layout()
    common.save_figure(figure, os.path.join(folder, "loss.png"))
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(tokens, [row["train_accuracy"] for row in history], label="train")
    axes.plot(tokens, [row["validation_accuracy"] for row in history], label="validation")
    axes.set(xlabel="training tokens (millions)", ylabel="next-token accuracy (argmax)")
    axes.set(title=title, ylim=(0, None))
    axes.legend()
    figure.tight_layout()
    common.save_figure(figure, os.path.join(folder, "accuracy.png"))
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    common.enable_compilation_cache(arguments)
    # Flags that contradict each other are usage errors (exit status 2), found before any
    # work, reported under the flag's name.
    try:
        training.select_devices(arguments.devices)
    except ValueError as error:
        parser.error(f"argument --devices: {error}")
    try:
        config = config_from_arguments(arguments)
        lm_training.make_mesh(config)
    except ValueError as error:
        parser.error(common.name_the_flag(str(error), arguments))
    problem = common.output_directory_problem(arguments.out)
    if problem is not None:
        parser.error(f"argument --out: {problem}")
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
    checkpoint_path = os.path.join(arguments.out, training.CHECKPOINT_FILENAME)
    resuming_from = None
    if arguments.resume and os.path.exists(checkpoint_path):
        try:
            resuming_from = lm_training.check_checkpoint(
                checkpoint_path, config, corpus.fingerprint
            )
        except ValueError as error:
            parser.error(f"argument --resume: {error}")

    device = jax.devices()[0]
    device_description = f"{device.platform}: {device.device_kind}"
    described = corpus.describe()
    print(f"device: {device_description} ({jax.device_count()} visible)")
    print(
        f"corpus: {corpus.source}; {described['train_tokens']:,} training tokens in "
        f"{corpus.train_files} files, {described['validation_tokens']:,} validation tokens in "
        f"{corpus.validation_files} files, vocabulary {corpus.vocab_size}"
    )
    entropy = text_corpus.unigram_entropy(corpus.train_tokens, corpus.vocab_size)
    unigram_validation = text_corpus.unigram_cross_entropy(
        corpus.train_tokens, corpus.validation_tokens, corpus.vocab_size
    )
    print(
        f"unigram entropy of the training tokens: {entropy:.3f} nats per token; a unigram "
        f"model's validation loss: {unigram_validation:.3f}"
    )
    if arguments.resume:
        print(common.resume_note(resuming_from, checkpoint_path))
    common.prepare_output(arguments.out, OUTPUTS_WRITTEN_ATOMICALLY)

    comparison = None
    if arguments.compare_steps:
        print(
            f"comparing the losses: {arguments.compare_steps} steps of each, each in a "
            "process of its own"
        )
        try:
            comparison = compare_losses(
                config,
                arguments,
                arguments.compare_steps,
                os.path.join(arguments.out, "comparison"),
            )
        except RuntimeError as error:
            print(f"stopped: {error}", file=sys.stderr)
            return 1
        print(comparison_table(comparison))

    result = common.train_with_progress(
        lambda on_run_end: lm_training.train(
            config,
            corpus,
            checkpoint_dir=arguments.out,
            resume=arguments.resume,
            on_run_end=on_run_end,
        ),
        config.steps,
        lambda row: {
            "loss": f"{row['batch_loss']:.3f}",
            "val": f"{row['validation_loss']:.3f}",
            "tok_s": f"{row['tokens_per_second']:,.0f}",
        },
        initial=resuming_from or 0,
        disabled=arguments.no_progress,
    )
    if result is None:  # stopped on a non-finite value
        return 2

    final = result.history[-1]
    parameters = sum(leaf.size for leaf in jax.tree_util.tree_leaves(result.params))
    metrics = {
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
        "parameters": parameters,
        "train_seconds": result.train_seconds,
        "train_seconds_note": "wall time of lm_training.train in this process, compilation and "
        "evaluation included"
        + (f"; resumed from step {result.resumed_from}" if result.resumed_from is not None else ""),
        "device": device_description,
        "devices": result.devices,
        "versions": common.library_versions(("tokenizers",)),
        "corpus": described,
        "config": config.to_dict(),
    }
    common.write_json(os.path.join(arguments.out, "metrics.json"), metrics)
    common.write_history(os.path.join(arguments.out, "history.csv"), result.history)
    if not arguments.no_plots:
        title = (
            f"{config.num_layers} layers, d = {config.d_model}, V = {corpus.vocab_size}, "
            f"{config.loss} loss"
        )
        plot_curves(
            arguments.out,
            result.history,
            {
                "unigram entropy, training tokens": entropy,
                "unigram model, validation": unigram_validation,
            },
            title,
        )
    ran = f"{result.steps} steps"
    if result.resumed_from is not None:
        ran = (
            f"{result.steps - result.resumed_from} steps, resumed from step {result.resumed_from},"
        )
    print(
        f"validation loss {final['validation_loss']:.4f} (unigram entropy {entropy:.4f}), "
        f"validation accuracy {final['validation_accuracy']:.4f}, "
        f"{result.tokens_per_second:,.0f} tokens/s, {ran} in {result.train_seconds:.1f} s"
    )
    written = ["metrics.json", "history.csv"]
    if config.checkpoint_every:
        written.append(training.CHECKPOINT_FILENAME)
    if not arguments.no_plots:
        written += ["loss.png", "accuracy.png"]
    print(f"wrote {arguments.out}/" + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

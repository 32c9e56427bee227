"""Tune the language model with DPO to prefer a file's true continuation to its own samples.

The policy starts as the transformer that ``experiments/language_model.py`` trained on the
Python standard library's sources (its checkpoint), and the frozen reference of DPO is the same
checkpoint. The preference pairs are made without a human (``preference_pairs.py``): the prompt
is ``--prompt-tokens`` tokens of a file, the chosen response the file's next
``--response-tokens`` tokens, and the rejected one the model's own continuation of the prompt
(``--rejected sample``, the default, as in SPIN), the true continuation shuffled
(``shuffled``), or half of each (``mix``). The model's samples are the default because they are
the text it would write, and it cannot tell them from the text: before training it gives the
true continuation the larger log-probability in only 57.8% of the held-out pairs, where a
shuffled continuation is a negative it already rejects (in all 256 held-out pairs, the true
continuation shuffled: 8.14 nats per token against the truth's 5.16), so that DPO has less to
teach. The training pairs come from the training files, the held-out pairs from the validation
files (``text_corpus.py``'s split); the samples are drawn once, from the starting model, before
training.

Each step takes ``--pairs-per-step`` training pairs and one Adam step on
``jaxsoftmax.linear_preference_loss`` (DPO's sigmoid loss, ``--beta``) from the hidden states:
the policy's and the reference's log-probabilities of every response token without either
model's ``[tokens, vocabulary]`` logits (``--loss fused``), or from the logits with
``jaxsoftmax.token_log_probs``, ``sequence_log_probs`` and ``preference_loss``
(``--loss naive``) (``preference_training.py``).

The defaults (2048 training pairs, 256 steps of 16 pairs: two passes over them; DPO's sigmoid
loss with beta 0.5; Adam at 1e-4) raise the held-out pairs' reward accuracy from 0% (before
training the policy is the reference and every implicit reward is 0) to 76.2% and their reward
margin to 0.720 (experiments/results/preference/); the training batches reach 94% on their
second pass. The true continuations keep their likelihood (5.163 -> 5.156 nats per token)
while the rejected samples lose theirs (5.425 -> 5.508), and the language model's validation
loss moves from 5.0768 to 5.0876 nats per token. The policy's own preference moves less (the
true continuation more likely than the sample in 60.5% of the held-out pairs, 57.8% before):
the implicit reward is the change from the reference, and beta 0.5 keeps that change small.
With ``--beta 0.1`` (TRL's default) the accuracy reached 69.5% (margin 0.268) and the policy
went further from the reference: the true continuations' loss rose to 5.376 and the validation
loss to 5.2827; beta 0.25 gave 75.8% (margin 0.49, true continuations 5.211). Beta was chosen on
these held-out pairs (three values, after Adam at 1e-4 and 3e-4 on 768 pairs). The fused update
compiles to 42.8 MiB of temporary memory against 102.1 MiB through the logits (0.42: the two
models' [512 tokens, 16384] float32 logits are 32 MiB each, and at so few tokens the rest of
the step weighs as much; experiments/benchmark_preference.py measures the loss at Llama 3's
shape) and takes 0.92 of its time; the two give the same loss and metrics within 1.5e-5.

    python experiments/language_model.py    # the model, if not trained yet (5 minutes)
    python experiments/preference.py        # about 3 to 4 minutes on 2 CPU cores
    python experiments/preference.py --beta 0.1 --out runs/preference_beta01
    python experiments/preference.py --steps 2048 --pairs-per-step 64 --train-pairs 65536 \\
        --eval-pairs 1024 --response-tokens 64 --eval-every 128 --checkpoint-every 128 \\
        --out runs/preference_gpu    # for a GPU

Before training, the script compiles the update with each loss at the run's shape and reports
side by side its temporary memory and its seconds per update (``--compare-rounds`` rounds).
Every ``--eval-every`` steps the held-out pairs are scored again (the reward accuracy and
margin of DPO's implicit reward ``beta log(pi / pi_ref)``, the policy's own preference, the
log-likelihood of both responses) and so is the language model's next-token loss on the
validation windows of ``language_model.py``.

Writes into ``--out``: metrics.json, history.csv, rewards.png, log_probs.png and
checkpoint.npz (``--resume`` continues from it and ends where an uninterrupted run would).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
import lm_training
import preference_pairs
import preference_training
import tuning
from common import non_negative_int, number, positive_float, positive_int

OUTPUTS_WRITTEN_ATOMICALLY = ("metrics.json", "history.csv", "rewards.png", "log_probs.png")
DEFAULT_OUT = os.path.join("experiments", "results", "preference")
below_one_half = number(float, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")
at_least_two = number(int, lambda v: v >= 2, "an integer >= 2")
# The flags that set a field of preference_training.PreferenceConfig, its default theirs:
# (field, type or choices, help).
FLAGS = (
    (
        "loss",
        preference_training.LOSSES,
        "how the log-probabilities are computed: fused: linear_preference_loss from the hidden "
        "states, no [tokens, vocabulary] array for the policy or the reference; naive: both "
        "models' logits, then token_log_probs, sequence_log_probs and preference_loss",
    ),
    (
        "loss_type",
        preference_training.LOSS_TYPES,
        "the preference loss: sigmoid is DPO's; ipo, hinge and robust its variants "
        "(jaxsoftmax.preference_loss)",
    ),
    (
        "beta",
        positive_float,
        "the implicit reward is beta log(policy / reference) of a response: larger keeps the "
        "policy closer to the reference",
    ),
    (
        "label_smoothing",
        below_one_half,
        "the share of pairs assumed mislabelled (conservative DPO); 0: trust every pair",
    ),
    (
        "rejected",
        preference_pairs.REJECTED,
        "the rejected response: sample: the model's own continuation of the prompt; "
        "shuffled: the true continuation's tokens in a random order; mix: half of each",
    ),
    (
        "sample_temperature",
        positive_float,
        "the model's scores are divided by it before the softmax when it writes the "
        "rejected responses: below 1 it writes its likelier tokens more often",
    ),
    ("steps", positive_int, "optimizer steps, each on --pairs-per-step training pairs"),
    ("pairs_per_step", positive_int, "training pairs in each step's batch"),
    ("prompt_tokens", positive_int, "tokens of each prompt, a window of a file"),
    (
        "response_tokens",
        at_least_two,
        "tokens of each response: the file's next tokens (chosen) and the rejected one",
    ),
    ("learning_rate", positive_float, "Adam's step size, constant"),
    ("clip_norm", positive_float, "gradients clipped to this global norm"),
    (
        "train_pairs",
        positive_int,
        "pairs cut from the training files, a multiple of --pairs-per-step; each step takes "
        "the next of them in an order drawn afresh for each pass",
    ),
    (
        "eval_pairs",
        positive_int,
        "held-out pairs cut from the validation files, a multiple of --pairs-per-step",
    ),
    (
        "seed",
        non_negative_int,
        "start of the random numbers: where the prompts are cut, the rejected responses and "
        "the order of the training pairs",
    ),
    *tuning.SCHEDULE_FLAGS,
)


def build_parser() -> argparse.ArgumentParser:
    return tuning.build_parser(
        __doc__,
        preference_training.PreferenceConfig,
        FLAGS,
        ": the policy's start and the reference",
        DEFAULT_OUT,
    )


def load_inputs(parser: argparse.ArgumentParser, arguments: argparse.Namespace):
    """``(config, corpus, checkpoint)`` of the run the flags ask for
    (:func:`tuning.load_inputs`)."""
    return tuning.load_inputs(parser, arguments, preference_training.PreferenceConfig, FLAGS)


# ---------------------------------------------------------------------------------------------
# What a run reports


def comparison_table(comparison: dict) -> str:
    """The comparison as lines of text: a row per measurement, a column per loss, and how far
    the two losses' values are apart."""
    shape = comparison["shape"]
    lines = tuning.comparison_lines(
        comparison,
        f"{shape['pairs']} pairs: {shape['responses']} responses of {shape['response_tokens']} "
        f"tokens after {shape['prompt_tokens']} prompt tokens, vocabulary "
        f"{shape['vocab_size']}, policy and reference",
    )
    lines.append(
        "largest difference of the loss and metrics between the two: "
        f"{comparison['loss_and_metrics_max_difference']:.2e}"
    )
    return "\n".join(lines)


def plot(folder: str, history: list[dict], title: str) -> None:
    """rewards.png (the reward accuracy and margin of the held-out pairs and of the training
    batches) and log_probs.png (the held-out responses' negative log-likelihood per token and
    the language model's validation loss) against the steps."""
    plt = common.pyplot()
    steps = [row["step"] for row in history]
    trained = [row for row in history if row["train_loss"] is not None]
    figure, panels = plt.subplots(1, 2, figsize=(12, 4.5))
    for axes, (name, label) in zip(
        panels,
        (
            ("reward_accuracy", "reward accuracy: share of pairs, chosen rewarded more"),
            ("reward_margin", "reward margin: chosen's reward - rejected's"),
        ),
        strict=True,
    ):
        axes.plot(steps, [row[f"heldout_{name}"] for row in history], "o-", label="held-out pairs")
        axes.plot([row["step"] for row in trained], [row[f"train_{name}"] for row in trained],
                  label="training batches (mean since the last evaluation)")  # fmt: skip
        axes.set(xlabel="step", ylabel=label)
        axes.legend()
    panels[0].plot(steps, [row["heldout_preference_accuracy"] for row in history], "s--",
                   label="held-out: policy's log p(chosen) > log p(rejected)")  # fmt: skip
    panels[0].axhline(0.5, color="grey", linestyle=":", label="chance")
    panels[0].set(ylim=(0, 1))
    panels[0].legend()
    figure.suptitle(title)
    common.write_figure(figure, os.path.join(folder, "rewards.png"))

    figure, panels = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, label in (("chosen", "chosen (true continuation)"), ("rejected", "rejected")):
        panels[0].plot(steps, [row[f"heldout_{name}_nll"] for row in history], "o-", label=label)
    panels[0].set(xlabel="step", ylabel="held-out responses: -log p per token (nats)")
    panels[0].legend()
    panels[1].plot(steps, [row["validation_loss"] for row in history], "o-")
    panels[1].set(xlabel="step", ylabel="validation loss of next tokens (nats)")
    figure.suptitle(title)
    common.write_figure(figure, os.path.join(folder, "log_probs.png"))


HELD_OUT = (
    "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
    "preference_accuracy", "chosen_nll", "rejected_nll", "loss",
)  # fmt: skip


def summary(history: list[dict]) -> dict:
    """Before and after on the held-out pairs and the validation windows, in numbers and a
    sentence."""
    first, last = history[0], history[-1]
    before = {key: first[f"heldout_{key}"] for key in HELD_OUT} | {
        "validation_loss": first["validation_loss"]
    }
    after = {key: last[f"heldout_{key}"] for key in HELD_OUT} | {
        "validation_loss": last["validation_loss"]
    }
    best = max(history, key=lambda row: row["heldout_reward_accuracy"])
    finding = (
        f"After {last['step']} steps the held-out pairs' reward accuracy is "
        f"{after['reward_accuracy']:.1%} (0% before: the policy is the reference, every reward "
        f"0) and their reward margin {after['reward_margin']:.3f}; the policy gives the true "
        f"continuation the larger log-probability in {after['preference_accuracy']:.1%} of "
        f"them, against {before['preference_accuracy']:.1%} before. Per response token, the "
        f"true continuations' negative log-likelihood went from {before['chosen_nll']:.3f} to "
        f"{after['chosen_nll']:.3f} nats and the rejected ones' from "
        f"{before['rejected_nll']:.3f} to {after['rejected_nll']:.3f}; the language model's "
        f"validation loss from {before['validation_loss']:.4f} to "
        f"{after['validation_loss']:.4f} nats per token."
    )
    return {
        "finding": finding,
        "heldout_before": before,
        "heldout_after": after,
        "heldout_best_reward_accuracy": {
            "step": best["step"],
            "reward_accuracy": best["heldout_reward_accuracy"],
        },
        "heldout_note": "held-out pairs cut from the validation files; rewards are DPO's "
        "implicit rewards beta (log pi - log pi_ref) of each response (summed over its tokens; "
        "means for ipo), as jaxsoftmax.preference_loss gives them: reward_accuracy is the "
        "share of pairs whose chosen response has the larger reward, reward_margin the mean "
        "of chosen's minus rejected's; preference_accuracy: the share of pairs where the "
        "policy's own log-probability of the chosen response is the larger; chosen_nll and "
        "rejected_nll: the policy's -log p per response token; loss: the preference loss; "
        "validation_loss: the language model's next-token cross-entropy on language_model.py's "
        "fixed validation windows",
    }


def comparison_ratios(comparison: dict | None) -> dict | None:
    if comparison is None:
        return None
    fused, naive = comparison["fused"], comparison["naive"]
    return {key: fused[key] / naive[key] for key in ("step_temp_bytes", "seconds_per_update")} | {
        "note": "fused / naive"
    }


def describe_pairs(pairs: preference_training.PairSets) -> dict:
    """What the pairs are, for metrics.json."""
    return {
        split: {
            "pairs": len(found),
            "sampled_rejected": int(found.sampled.sum()),
            "identical_responses": found.identical(),
        }
        for split, found in (("train", pairs.train), ("held_out", pairs.held_out))
    } | {
        "note": "chosen: the file's true continuation of the prompt; rejected: the starting "
        "model's sample (sampled_rejected of them) or the true continuation shuffled; "
        "identical_responses: pairs whose sample is the true continuation itself (no gradient)"
    }


def metrics(config, result, comparison, examples, pairs, argv, arguments, corpus, started):
    """metrics.json of a run."""
    return {
        **summary(result.history),
        "comparison": comparison,
        "comparison_ratios": comparison_ratios(comparison),
        "pairs": describe_pairs(pairs),
        "examples": examples,
        "steps": result.steps,
        "seconds_per_step": result.seconds_per_step,
        "seconds_per_step_note": "the updates alone: no compilation, no evaluation",
        "train_seconds": result.train_seconds,
        "train_seconds_note": common.seconds_note(
            "wall time of preference_training.train in this process, compilation and "
            "evaluations included",
            result.resumed_from,
        ),  # fmt: skip
        "script_seconds": time.perf_counter() - started,
        "script_seconds_note": "wall time of this process's main(): pairs (sampling), "
        "comparison and training",
        **tuning.run_description(arguments, argv, "preference.py", result.params, corpus, config),
    }


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = build_parser()
    arguments = common.parse_flags(parser, argv)
    config, corpus, checkpoint = load_inputs(parser, arguments)
    model = config.model
    print(f"device: {common.device_description()}")
    print(
        f"model: {model.num_layers} layer{'s' * (model.num_layers != 1)}, d = {model.d_model}, "
        f"vocabulary {corpus.vocab_size} ({arguments.model}); {config.pairs_per_step} pairs "
        f"per step, responses of {config.response_tokens} tokens after "
        f"{config.prompt_tokens}, {config.loss_type} loss, beta {config.beta:g}, "
        f"{config.loss} log-probabilities"
    )
    common.start_output(arguments, OUTPUTS_WRITTEN_ATOMICALLY, checkpoint)
    path = lm_training.trained_checkpoint(arguments.model, "the model")
    params = lm_training.load_params(path, model, corpus.vocab_size)
    began = time.perf_counter()
    pairs = preference_training.make_pairs(config, corpus, params)
    print(
        f"pairs: {len(pairs.train)} for training, {len(pairs.held_out)} held out, rejected: "
        f"{config.rejected} ({time.perf_counter() - began:.1f} s)"
    )
    comparison = None
    if arguments.compare_rounds:
        print(f"comparing the two losses' updates ({arguments.compare_rounds} rounds)")
        comparison = preference_training.compare_losses(
            config, pairs, params, arguments.compare_rounds
        )
        print(comparison_table(comparison))
    result = common.train_with_progress(
        functools.partial(preference_training.train, config, corpus, pairs, params),
        arguments,
        config.steps,
        lambda row: {
            "accuracy": f"{row['heldout_reward_accuracy']:.2f}",
            "margin": f"{row['heldout_reward_margin']:.2f}",
            "validation": f"{row['validation_loss']:.3f}",
        },
        initial=checkpoint[1] or 0,
    )
    if result is None:  # stopped on a non-finite value
        return 2
    examples = preference_training.examples(config, pairs, params, result.params)
    found = metrics(config, result, comparison, examples, pairs, argv, arguments, corpus, started)
    common.write_json(os.path.join(arguments.out, "metrics.json"), found)
    common.write_history(os.path.join(arguments.out, "history.csv"), result.history)
    written = ["metrics.json", "history.csv"]
    if config.checkpoint_every:
        written.append(lm_training.CHECKPOINT_FILENAME)
    if not arguments.no_plots:
        title = (
            f"DPO ({config.loss_type}, beta {config.beta:g}), {config.pairs_per_step} pairs per "
            f"step, rejected: {config.rejected}, lr {config.learning_rate:g}"
        )
        plot(arguments.out, result.history, title)
        written += ["rewards.png", "log_probs.png"]
    print(found["finding"])
    print(
        f"{common.steps_ran(result.steps, result.resumed_from)} in "
        f"{result.train_seconds:.1f} s ({result.seconds_per_step:.2f} s per update)"
    )
    common.report_written(arguments.out, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())

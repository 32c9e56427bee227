"""Distil the trained language model into a smaller one, and compare with training on labels alone.

The teacher is the transformer that ``experiments/language_model.py`` trained (its checkpoint;
its parameters are never updated). Two students, smaller transformers of the same kind, start
from the same weights and train for the same steps on the same windows of the same tokens:

- distilled: ``jaxsoftmax.linear_distillation_loss(student_hidden, student_classifier,
  teacher_hidden, teacher_classifier, labels=...)``, the divergence between the teacher's and
  the student's next-token distributions at temperature ``T`` (times ``T^2``) plus
  ``--hard-weight`` times the cross-entropy on the labels; neither model's ``[tokens, V]``
  logits are ever built;
- labels only: ``jaxsoftmax.linear_cross_entropy`` on the labels.

Both are evaluated every ``--eval-every`` steps on the same fixed windows of each split
(next-token cross-entropy in nats per token, and accuracy), beside the teacher's loss on the
same windows. The defaults (forward KL, ``T = 1``, hard weight 0.5, 150 steps) end with the
distilled student 0.23 nats per token below the labels-only one (experiments/results/distill/);
with ``--temperature 2`` the gain vanished (6.997 against 6.987): the teacher's next-token
distribution is flat already (5.3 nats of entropy), and ``T = 2`` flattens it further.

    python experiments/language_model.py          # the teacher, if not trained yet (5 minutes)
    python experiments/distill.py                 # about 4 minutes on 2 CPU cores
    python experiments/distill.py --divergence reverse_kl --hard-weight 0 --out runs/reverse

Writes into ``--out``: metrics.json, history.csv, validation_loss.png, training_loss.png and
checkpoint.npz (``--resume`` continues from it and ends where an uninterrupted run would).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
import lm_training  # helper modules of the scripts
import text_corpus
import transformer
from common import non_negative_float, non_negative_int, number, positive_float, positive_int

import jaxsoftmax
from jaxsoftmax import training
from jaxsoftmax.training import TrainState

DEFAULT_TEACHER = lm_training.DEFAULT_RUN  # where language_model.py writes it
STUDENTS = ("distilled", "labels_only")
LABELS = {"distilled": "distilled", "labels_only": "labels only"}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
OUTPUTS_WRITTEN_ATOMICALLY = (
    "metrics.json",
    "history.csv",
    "validation_loss.png",
    "training_loss.png",
)
EVALUATED = ("loss", "accuracy", "entropy")  # of lm_training.summarise, per split
fraction = number(float, lambda v: 0 < v < 1, "a number in (0, 1)")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Every setting of a distillation run.

    Attributes:
      teacher: the teacher's settings, as its checkpoint records them.
      teacher_fingerprint: SHA-256 of the teacher's checkpoint file: a run is never resumed
        with another teacher.
      student: both students' settings: model, optimizer, steps, windows, evaluation (the
        corpus and vocabulary are the teacher's; ``loss`` fused, no z-loss).
      divergence, temperature, beta, hard_weight: the distillation loss's arguments.
    """

    teacher: lm_training.LMConfig
    teacher_fingerprint: str
    student: lm_training.LMConfig
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    hard_weight: float = 0.5

    def to_dict(self) -> dict:
        """Flat: the student's settings, then the distillation's and the teacher's."""
        return {
            **self.student.to_dict(),
            "divergence": self.divergence,
            "temperature": self.temperature,
            "beta": self.beta,
            "hard_weight": self.hard_weight,
            "teacher": self.teacher.to_dict(),
            "teacher_fingerprint": self.teacher_fingerprint,
        }


# ---------------------------------------------------------------------------------------------
# The teacher


def teacher_checkpoint(folder: str) -> str:
    """The teacher's checkpoint in ``folder``, or ``FileNotFoundError`` saying how to make it."""
    return lm_training.trained_checkpoint(folder, "the teacher")


def read_teacher(folder: str) -> tuple[lm_training.LMConfig, str, str]:
    """``(config, corpus fingerprint, file fingerprint)`` of the teacher in ``folder``; reads
    no parameters."""
    path = teacher_checkpoint(folder)
    try:
        with open(path, "rb") as file:
            payload = file.read()
        with np.load(path, allow_pickle=False) as stored:
            config = lm_training.LMConfig(**json.loads(str(stored["config"])))
            corpus = str(stored["corpus"])
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise ValueError(
            f"the teacher's checkpoint {path} cannot be read ({type(error).__name__}: {error}); "
            f"train it again with {lm_training.train_command(folder)}"
        ) from None
    return config, corpus, hashlib.sha256(payload).hexdigest()


def load_teacher_params(folder: str, config: lm_training.LMConfig, vocab_size: int):
    """The teacher's parameters, on the default device."""
    return lm_training.load_params(teacher_checkpoint(folder), config, vocab_size)


# ---------------------------------------------------------------------------------------------
# The two students' objectives and their step


def objectives(config: DistillConfig, params: dict, teacher_params, windows: jax.Array):
    """The sum of both students' objectives on token windows ``[B, T + 1]`` (their gradients
    are each student's own), and ``{student: objective}``."""
    inputs, labels = windows[:, :-1], windows[:, 1:]
    teacher_hidden = jax.lax.stop_gradient(
        transformer.hidden_states(teacher_params, inputs, num_heads=config.teacher.num_heads)
    )
    teacher_classifier = jax.lax.stop_gradient(transformer.classifier(teacher_params))
    hidden = {
        name: transformer.hidden_states(params[name], inputs, num_heads=config.student.num_heads)
        for name in STUDENTS
    }
    losses = {
        "distilled": jaxsoftmax.linear_distillation_loss(
            hidden["distilled"],
            transformer.classifier(params["distilled"]),
            teacher_hidden,
            teacher_classifier,
            labels=labels,
            divergence=config.divergence,
            temperature=config.temperature,
            beta=config.beta,
            hard_weight=config.hard_weight,
        ),
        "labels_only": jaxsoftmax.linear_cross_entropy(
            hidden["labels_only"], transformer.classifier(params["labels_only"]), labels
        ),
    }
    return losses["distilled"] + losses["labels_only"], losses


def make_step(config: DistillConfig, optimizer) -> Callable:
    """A jitted ``(state, teacher_params, train_tokens) -> (state, objectives)``: step
    ``state.step`` of both students on the same windows (those ``lm_training`` draws for the
    step), each with an optimizer state of its own (the gradient clipping's norm is each
    student's). ``state`` is donated."""
    student = config.student

    def step(state: TrainState, teacher_params, tokens: jax.Array):
        starts = lm_training.window_starts(student, tokens.shape[0], state.step)
        windows = lm_training.gather_windows(tokens, starts, student.seq_len + 1)
        (_, losses), grads = jax.value_and_grad(
            lambda p: objectives(config, p, teacher_params, windows), has_aux=True
        )(state.params)
        params, opt_state = {}, {}
        for name in STUDENTS:
            updates, opt_state[name] = optimizer.update(
                grads[name], state.opt_state[name], state.params[name]
            )
            params[name] = optax.apply_updates(state.params[name], updates)
        return TrainState(params, opt_state, state.step + 1), losses

    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=4)
def compiled_functions(config: DistillConfig, vocab_size: int) -> dict:
    """The optimizer and jitted functions of ``config``, made once per process."""
    optimizer = lm_training.make_optimizer(config.student)

    def fresh_student():
        params = lm_training.init_params(config.student, vocab_size)
        return params, optimizer.init(params)

    abstract_params, abstract_opt_state = jax.eval_shape(fresh_student)
    return {
        "optimizer": optimizer,
        "abstract_state": TrainState(
            {name: abstract_params for name in STUDENTS},
            {name: abstract_opt_state for name in STUDENTS},
            jax.ShapeDtypeStruct((), jnp.int32),
        ),
        "init": jax.jit(fresh_student, compiler_options=training.RUN_ONCE_COMPILER_OPTIONS),
        "step": make_step(config, optimizer),
        "evaluate_student": lm_training.make_evaluate(config.student),
        "evaluate_teacher": lm_training.make_evaluate(config.teacher),
        "compiled_steps": {},
    }


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class DistillResult:
    """What :func:`train` returns: ``params`` of each student, ``history`` (one row per
    evaluation, the first at step 0), ``teacher`` (its metrics on the evaluation windows),
    ``steps``, ``resumed_from`` (the checkpoint's step or None), ``seconds_per_step`` (both
    students' step; no compilation, no evaluation; steps before a resume included) and
    ``train_seconds`` (this call's wall time, compilation and evaluation included)."""

    params: dict
    history: list[dict]
    teacher: dict
    steps: int
    resumed_from: int | None
    seconds_per_step: float
    train_seconds: float


def train(
    config: DistillConfig,
    corpus,
    teacher_params,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    on_run_end: Callable[[dict, int], None] | None = None,
) -> DistillResult:
    """Trains both students on ``corpus``; ``eval_every`` steps at a time, then an evaluation
    of both on the fixed windows of both splits, a checkpoint every ``checkpoint_every`` steps
    (both students, their optimizer states and the history; a resumed run ends bit for bit
    where an uninterrupted one does, on the CPU), through the run loop of
    :func:`jaxsoftmax.training.run_loop` (``lm_training.run_training``).

    History rows: ``step``, ``tokens`` (each student trained on so far), ``{student}_objective``
    (the mean over the run's steps of what each minimises, each before its update), then for
    each student and split ``{student}_{split}_{loss, accuracy, entropy}`` (cross-entropy in
    nats per token), ``run_seconds`` and ``tokens_per_second`` (each student's tokens over the
    wall time of the steps since the last row).
    """
    started = time.perf_counter()
    student = config.student
    functions = compiled_functions(config, corpus.vocab_size)
    train_tokens = jax.device_put(corpus.train_tokens)
    windows = lm_training.placed_evaluation_windows(student, corpus)
    evaluate = {
        which: lm_training.evaluator(functions[f"evaluate_{which}"], windows, EVALUATED)
        for which in ("student", "teacher")
    }

    def evaluate_students(params) -> dict:
        return {
            f"{name}_{key}": value
            for name in STUDENTS
            for key, value in evaluate["student"](params[name]).items()
        }

    checkpoint_path = training.prepare_checkpoint(
        checkpoint_dir if student.checkpoint_every else None
    )

    def load(path: str) -> tuple[TrainState, list[dict]]:
        lm_training.check_checkpoint(path, config, corpus.fingerprint)
        state, history = lm_training.load_checkpoint(path, functions["abstract_state"])
        return jax.device_put(state), history

    def fresh() -> tuple[TrainState, list[dict]]:
        state = initial_students(functions)
        no_step = {f"{name}_objective": None for name in STUDENTS}
        return state, [lm_training.first_row(no_step, evaluate_students(state.params))]

    state, history, resumed_from = training.start_or_resume(
        checkpoint_path, resume, load=load, fresh=fresh
    )
    teacher = evaluate["teacher"](teacher_params)
    step_function = lm_training.compile_once(
        functions, train_tokens.shape, state, teacher_params, train_tokens
    )
    state, history = lm_training.run_training(
        student,
        state,
        history,
        run_steps=lm_training.steps_one_by_one(step_function, teacher_params, train_tokens),
        batch_columns=lambda losses: {
            f"{name}_objective": float(np.mean(losses[name])) for name in STUDENTS
        },
        checked=lambda losses: losses.values(),
        evaluate=evaluate_students,
        checkpoint=(checkpoint_path, config, corpus.fingerprint),
        resumed_from=resumed_from,
        on_run_end=on_run_end,
        subject="a student's loss or parameters",
        advice=f"Try a smaller --lr (was {student.learning_rate}).",
    )
    jax.block_until_ready(state.params)
    seconds = sum(row["run_seconds"] or 0.0 for row in history)
    return DistillResult(
        params=state.params,
        history=history,
        teacher=teacher,
        steps=int(state.step),
        resumed_from=resumed_from,
        seconds_per_step=seconds / int(state.step) if int(state.step) else 0.0,
        train_seconds=time.perf_counter() - started,
    )


def initial_students(functions: dict) -> TrainState:
    """Both students at the same initial weights, in buffers of their own (the step donates
    them)."""
    initial = [functions["init"]() for _ in STUDENTS]
    return TrainState(
        {name: params for name, (params, _) in zip(STUDENTS, initial, strict=True)},
        {name: opt for name, (_, opt) in zip(STUDENTS, initial, strict=True)},
        jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------------------------
# The script


def build_parser() -> argparse.ArgumentParser:
    parser = common.OneLineErrorParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--teacher",
        default=DEFAULT_TEACHER,
        help="folder of the trained language model (its checkpoint.npz), the output of "
        "python experiments/language_model.py",
    )
    add = parser.add_argument
    add("--student-d-model", type=positive_int, default=64, help="width of the students")
    add(
        "--student-layers",
        type=positive_int,
        default=1,
        help="transformer blocks of a student",
    )
    add(
        "--student-heads",
        type=positive_int,
        default=2,
        help="attention heads of a student; must divide --student-d-model",
    )
    add(
        "--student-d-ff",
        type=positive_int,
        default=None,
        help="hidden width of a student's MLPs; None: 4 x --student-d-model",
    )
    add(
        "--divergence",
        choices=DIVERGENCES,
        default="forward_kl",
        help="how the distilled student's next-token distribution is pulled towards the "
        "teacher's: forward_kl KL(teacher || student), covers every token the teacher deems "
        "likely; reverse_kl KL(student || teacher), settles on the teacher's likeliest tokens; "
        "jsd the Jensen-Shannon divergence, weighted by --beta",
    )
    add(
        "--temperature",
        type=positive_float,
        default=1.0,
        help="both models' scores are divided by it before the softmax: above 1 flattens the "
        "teacher's distribution, so its ranking of unlikely tokens counts more (the divergence "
        "is multiplied by its square, keeping the gradient's scale); a language model's "
        "next-token distribution is flat enough already at 1",
    )
    add(
        "--hard-weight",
        type=non_negative_float,
        default=0.5,
        help="weight of the ordinary cross-entropy on the true next tokens, added to the "
        "distillation term; 0: learn from the teacher alone",
    )
    add(
        "--beta",
        type=fraction,
        default=0.5,
        help="--divergence jsd only: the mixture's weight of the teacher",
    )
    add("--steps", type=positive_int, default=150, help="optimizer steps of each student")
    add(
        "--batch-size",
        type=positive_int,
        default=None,
        help="windows per step; None: the teacher's",
    )
    add(
        "--seq-len",
        type=positive_int,
        default=None,
        help="tokens per window, at most the teacher's; None: the teacher's",
    )
    add(
        "--lr",
        type=positive_float,
        default=3e-3,
        help="peak learning rate of AdamW, reached after --warmup-steps, cosine decay after "
        "(as the teacher was trained)",
    )
    add("--warmup-steps", type=non_negative_int, default=15, help="steps of linear warm-up")
    add(
        "--seed",
        type=int,
        default=0,
        help="random number that fixes the students' starting weights and the order of their "
        "training windows (both students share them)",
    )
    add(
        "--eval-every",
        type=positive_int,
        default=25,
        help="steps between evaluations of both students on both splits, one history row each",
    )
    add(
        "--eval-batches",
        type=positive_int,
        default=None,
        help="each evaluation reads this many batches of fixed windows of each split; None: "
        "the teacher's (so its loss matches its own metrics.json)",
    )
    add(
        "--checkpoint-every",
        type=non_negative_int,
        default=50,
        help="steps between checkpoints, a multiple of --eval-every; 0: none",
    )
    add("--out", default="runs/distill", help="output directory")
    add(
        "--corpus-cache",
        default=text_corpus.default_cache_directory(),
        help="folder of the cached tokenizer and token streams (shared with language_model.py)",
    )
    add("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    add("--no-plots", action="store_true", help="skip the two .png plots")
    add("--no-progress", action="store_true", help="no progress bar")
    common.add_cache_flag(parser)
    return parser


def config_from_arguments(arguments, teacher: lm_training.LMConfig, fingerprint: str):
    """The run's :class:`DistillConfig`; ``ValueError`` starting with the flag at fault."""
    if arguments.student_d_model % arguments.student_heads:
        raise ValueError(
            f"argument --student-heads: {arguments.student_heads} heads must divide "
            f"--student-d-model {arguments.student_d_model}"
        )
    if arguments.checkpoint_every % arguments.eval_every:
        raise ValueError(
            f"argument --checkpoint-every: {arguments.checkpoint_every} must be a multiple of "
            f"--eval-every {arguments.eval_every} (checkpoints are written after evaluations)"
        )
    if arguments.divergence != "jsd" and arguments.beta != 0.5:
        raise ValueError(
            f"argument --beta: {arguments.beta} weighs the Jensen-Shannon mixture; it applies "
            f"to --divergence jsd only, not {arguments.divergence}"
        )
    seq_len = arguments.seq_len or teacher.seq_len
    if seq_len > teacher.seq_len:
        raise ValueError(
            f"argument --seq-len: {seq_len} is longer than the teacher's windows "
            f"({teacher.seq_len} tokens, its position table's length)"
        )
    student = dataclasses.replace(
        teacher,
        d_model=arguments.student_d_model,
        num_layers=arguments.student_layers,
        num_heads=arguments.student_heads,
        d_ff=arguments.student_d_ff,
        seq_len=seq_len,
        batch_size=arguments.batch_size or teacher.batch_size,
        tied=True,
        loss="fused",
        z_loss=0.0,
        learning_rate=arguments.lr,
        warmup_steps=arguments.warmup_steps,
        steps=arguments.steps,
        seed=arguments.seed,
        eval_every=arguments.eval_every,
        eval_batches=arguments.eval_batches or teacher.eval_batches,
        checkpoint_every=arguments.checkpoint_every,
        devices=1,
        vocab_shards=1,
    )
    return DistillConfig(
        teacher=teacher,
        teacher_fingerprint=fingerprint,
        student=student,
        divergence=arguments.divergence,
        temperature=arguments.temperature,
        beta=arguments.beta,
        hard_weight=arguments.hard_weight,
    )


def layers(config: lm_training.LMConfig) -> str:
    return f"{config.num_layers} layer" + ("s" if config.num_layers != 1 else "")


def plot(folder: str, history: list[dict], teacher: dict, title: str) -> None:
    plt = common.pyplot()
    tokens = [row["tokens"] / 1e6 for row in history]
    for split, filename in (("validation", "validation_loss.png"), ("train", "training_loss.png")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for name in STUDENTS:
            values = [row[f"{name}_{split}_loss"] for row in history]
            axes.plot(tokens, values, label=f"student, {LABELS[name]} ({values[-1]:.3f})")
        value = teacher[f"{split}_loss"]
        axes.axhline(value, color="grey", linestyle="--", label=f"teacher ({value:.3f})")
        what = "validation" if split == "validation" else "training"
        axes.set(
            xlabel="training tokens per student (millions)",
            ylabel=f"{what} cross-entropy (nats per token)",
            title=title,
        )
        low = min(value, *(row[f"{n}_{split}_loss"] for row in history for n in STUDENTS))
        axes.set_ylim(low - 0.2, min(history[0][f"{STUDENTS[0]}_{split}_loss"], low + 4))
        axes.legend()
        figure.tight_layout()
        common.save_figure(figure, os.path.join(folder, filename))
        plt.close(figure)


def summary(result: DistillResult) -> dict:
    """The final validation losses and what they show, in words."""
    history = result.history
    final = history[-1]
    distilled = final["distilled_validation_loss"]
    labels_only = final["labels_only_validation_loss"]
    teacher = result.teacher["validation_loss"]
    gain = labels_only - distilled
    verdict = (
        f"distillation lowered the student's validation loss by {gain:.4f} nats per token"
        if gain > 0
        else f"distillation did not help: the distilled student's validation loss is "
        f"{-gain:.4f} nats per token higher"
    )
    gap = labels_only - teacher
    closed = gain / gap if gap > 0 else None
    finding = (
        f"After {result.steps} steps ({final['tokens']:,} tokens each), {verdict} "
        f"({distilled:.4f} distilled, {labels_only:.4f} labels only; the teacher {teacher:.4f})"
    )
    if closed is not None:
        finding += f", {closed:.1%} of the labels-only student's gap to the teacher"
    # Steps to the labels-only student's final loss: the first evaluation at or below it.
    reached = next(
        (row["step"] for row in history if row["distilled_validation_loss"] <= labels_only), None
    )
    if reached is not None and gain > 0:
        finding += (
            f"; the distilled student reached the labels-only student's final validation loss "
            f"by step {reached} of {result.steps}"
        )
    return {
        "finding": finding + ".",
        "distilled_validation_loss": distilled,
        "labels_only_validation_loss": labels_only,
        "teacher_validation_loss": teacher,
        "difference": gain,
        "difference_note": "labels-only minus distilled validation loss, nats per token; "
        "positive: distillation helped",
        "gap_closed": closed,
        "gap_closed_note": "difference / (labels-only minus teacher validation loss)",
        "distilled_reached_labels_only_final_at_step": reached,
        "distilled_reached_note": "the first evaluation (every eval_every steps) at which the "
        "distilled student's validation loss was at most the labels-only student's final one; "
        "a distilled step costs more (the teacher's forward pass and its classifier in the loss)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    common.enable_compilation_cache(arguments)
    # Flags that contradict each other and a missing teacher are usage errors (exit status 2),
    # found before any work, reported under the flag's name.
    try:
        teacher_config, teacher_corpus, fingerprint = read_teacher(arguments.teacher)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"argument --teacher: {error}")
    try:
        config = config_from_arguments(arguments, teacher_config, fingerprint)
    except ValueError as error:
        parser.error(str(error))
    problem = common.output_directory_problem(arguments.out)
    if problem is not None:
        parser.error(f"argument --out: {problem}")
    checkpoint_path = os.path.join(arguments.out, lm_training.CHECKPOINT_FILENAME)
    resuming_from = None
    if arguments.resume and os.path.exists(checkpoint_path):
        try:  # the students' tokens are the teacher's, checked below
            resuming_from = lm_training.check_checkpoint(checkpoint_path, config, teacher_corpus)
        except ValueError as error:
            parser.error(f"argument --resume: {error}")
    corpus = text_corpus.load(
        teacher_config.vocab_size,
        validation_fraction=teacher_config.validation_fraction,
        max_files=teacher_config.max_files,
        cache_directory=arguments.corpus_cache,
    )
    if corpus.fingerprint != teacher_corpus:
        parser.error(
            f"argument --teacher: the teacher in {arguments.teacher} was trained on other tokens "
            "(another Python's standard library, or another tokenizer); train it again here"
        )

    device = jax.devices()[0]
    student, teacher = config.student, config.teacher
    print(f"device: {device.platform}: {device.device_kind}")
    print(
        f"teacher: {layers(teacher)}, d = {teacher.d_model}, trained {teacher.steps} steps "
        f"({arguments.teacher}); students: {layers(student)}, d = {student.d_model}, "
        f"vocabulary {corpus.vocab_size}"
    )
    if arguments.resume:
        print(common.resume_note(resuming_from, checkpoint_path))
    common.prepare_output(arguments.out, OUTPUTS_WRITTEN_ATOMICALLY)
    teacher_params = load_teacher_params(arguments.teacher, teacher, corpus.vocab_size)

    result = common.train_with_progress(
        lambda on_run_end: train(
            config,
            corpus,
            teacher_params,
            checkpoint_dir=arguments.out,
            resume=arguments.resume,
            on_run_end=on_run_end,
        ),
        student.steps,
        lambda row: {
            "distilled": f"{row['distilled_validation_loss']:.3f}",
            "labels_only": f"{row['labels_only_validation_loss']:.3f}",
        },
        initial=resuming_from or 0,
        disabled=arguments.no_progress,
    )
    if result is None:  # stopped on a non-finite value
        return 2

    final = result.history[-1]
    count = lambda params: sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    found = summary(result)
    metrics = {
        **found,
        "losses_note": "next-token cross-entropy in nats per token on the same "
        f"{student.eval_batches * student.batch_size} fixed windows of {student.seq_len} "
        "tokens of each split for the teacher and both students",
        "students": {
            name: {
                key: final[f"{name}_{key}"]
                for key in (f"{split}_{n}" for split in ("validation", "train") for n in EVALUATED)
            }
            | {
                "best_validation_loss": min(
                    row[f"{name}_validation_loss"] for row in result.history
                )
            }
            for name in STUDENTS
        },
        "teacher": {
            **result.teacher,
            "parameters": count(teacher_params),
            "checkpoint": os.path.relpath(teacher_checkpoint(arguments.teacher)),
        },
        "student_parameters": count(result.params["distilled"]),
        "steps": result.steps,
        "tokens_per_student": final["tokens"],
        "seconds_per_step": result.seconds_per_step,
        "seconds_per_step_note": "one step of both students (the teacher's forward pass "
        "included), no compilation, no evaluation",
        "train_seconds": result.train_seconds,
        "train_seconds_note": "wall time of distill.train in this process, compilation and "
        "evaluation included"
        + (f"; resumed from step {result.resumed_from}" if result.resumed_from is not None else ""),
        "device": f"{device.platform}: {device.device_kind}",
        "versions": common.library_versions(("tokenizers",)),
        "corpus": corpus.describe(),
        "config": config.to_dict(),
    }
    common.write_json(os.path.join(arguments.out, "metrics.json"), metrics)
    common.write_history(os.path.join(arguments.out, "history.csv"), result.history)
    written = ["metrics.json", "history.csv"]
    if student.checkpoint_every:
        written.append(lm_training.CHECKPOINT_FILENAME)
    if not arguments.no_plots:
        title = (
            f"students {layers(student)}, d = {student.d_model}; teacher "
            f"{layers(teacher)}, d = {teacher.d_model}\n{config.divergence}, "
            f"T = {config.temperature:g}, hard weight {config.hard_weight:g}"
        )
        plot(arguments.out, result.history, result.teacher, title)
        written += ["validation_loss.png", "training_loss.png"]
    print(found["finding"])
    print(
        f"{result.steps} steps in {result.train_seconds:.1f} s "
        f"({result.seconds_per_step:.3f} s per step of both students)"
    )
    print(f"wrote {arguments.out}/" + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

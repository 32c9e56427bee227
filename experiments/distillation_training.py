"""Distilling the language model of ``language_model.py`` into two smaller students: the
library behind ``distill.py``.

- :class:`DistillConfig`: the teacher's settings (from its checkpoint), the students' and the
  distillation loss's.
- :func:`read_teacher`, :func:`load_teacher_params`: the teacher's checkpoint.
- :func:`objectives`, :func:`make_step`: both students' objectives (``distilled``:
  ``jaxsoftmax.linear_distillation_loss``; ``labels_only``: ``jaxsoftmax.linear_cross_entropy``)
  and one jitted step of both on the same windows.
- :func:`train`: the run loop of ``lm_training.run_training`` (evaluations, checkpoints,
  ``resume``), returning a :class:`DistillResult`.
- :func:`summary`, :func:`metrics`, :func:`plot`: what a run reports and writes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import common
import jax
import jax.numpy as jnp
import lm_training
import numpy as np
import optax
import transformer

import jaxsoftmax
from jaxsoftmax import training
from jaxsoftmax.training import TrainState

DEFAULT_TEACHER = lm_training.DEFAULT_RUN  # where language_model.py writes it
STUDENTS = ("distilled", "labels_only")
LABELS = {"distilled": "distilled", "labels_only": "labels only"}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
EVALUATED = ("loss", "accuracy", "entropy")  # of lm_training.summarise, per split


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
    """``(config, corpus fingerprint, file fingerprint)`` of the teacher in ``folder``
    (:func:`lm_training.read_trained`); reads no parameters."""
    return lm_training.read_trained(folder, "the teacher")


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

    def fresh() -> tuple[TrainState, list[dict]]:
        state = initial_students(functions)
        no_step = {f"{name}_objective": None for name in STUDENTS}
        return state, [lm_training.first_row(no_step, evaluate_students(state.params))]

    start = lm_training.start_run(
        student,
        config,
        corpus,
        functions["abstract_state"],
        fresh,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    teacher = evaluate["teacher"](teacher_params)
    step_function = lm_training.compile_once(
        functions, train_tokens.shape, start.state, teacher_params, train_tokens
    )
    state, history = lm_training.run_training(
        student,
        start,
        run_steps=lm_training.steps_one_by_one(step_function, teacher_params, train_tokens),
        batch_columns=lambda losses: {
            f"{name}_objective": float(np.mean(losses[name])) for name in STUDENTS
        },
        checked=lambda losses: losses.values(),
        evaluate=evaluate_students,
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
        resumed_from=start.resumed_from,
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

# ---------------------------------------------------------------------------------------------
# What a run reports


def layers(config: lm_training.LMConfig) -> str:
    return f"{config.num_layers} layer" + ("s" if config.num_layers != 1 else "")


def title(config: DistillConfig) -> str:
    """The plots' title: both models' shapes and the loss's settings."""
    student, teacher = config.student, config.teacher
    return (
        f"students {layers(student)}, d = {student.d_model}; teacher "
        f"{layers(teacher)}, d = {teacher.d_model}\n{config.divergence}, "
        f"T = {config.temperature:g}, hard weight {config.hard_weight:g}"
    )


def plot(folder: str, history: list[dict], teacher: dict, title: str) -> None:
    """validation_loss.png and training_loss.png: both students' losses against the tokens
    each trained on, beside the teacher's."""
    plt = common.pyplot()
    tokens = [row["tokens"] / 1e6 for row in history]
    for split, filename in (("validation", "validation_loss.png"), ("train", "training_loss.png")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        lines = {}
        for name in STUDENTS:
            values = [row[f"{name}_{split}_loss"] for row in history]
            lines[f"student, {LABELS[name]} ({values[-1]:.3f})"] = values
        value = teacher[f"{split}_loss"]
        low = min(value, *(row[f"{n}_{split}_loss"] for row in history for n in STUDENTS))
        common.plot_lines(
            axes,
            tokens,
            lines,
            [(f"teacher ({value:.3f})", value, "--")],
            xlabel="training tokens per student (millions)",
            ylabel=f"{'validation' if split == 'validation' else 'training'} cross-entropy "
            "(nats per token)",
            title=title,
            ylim=(low - 0.2, min(history[0][f"{STUDENTS[0]}_{split}_loss"], low + 4)),
        )
        common.write_figure(figure, os.path.join(folder, filename))


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


def metrics(config: DistillConfig, result: DistillResult, teacher_params, teacher: str, corpus):
    """metrics.json of a run: :func:`summary`, both students' final metrics, the teacher's (its
    checkpoint in the folder ``teacher``), the timings, versions, corpus and settings."""
    student, final = config.student, result.history[-1]
    final_metrics = [f"{split}_{n}" for split in ("validation", "train") for n in EVALUATED]
    return {
        **summary(result),
        "losses_note": "next-token cross-entropy in nats per token on the same "
        f"{student.eval_batches * student.batch_size} fixed windows of {student.seq_len} "
        "tokens of each split for the teacher and both students",
        "students": {
            name: {key: final[f"{name}_{key}"] for key in final_metrics}
            | {
                "best_validation_loss": min(
                    row[f"{name}_validation_loss"] for row in result.history
                )
            }
            for name in STUDENTS
        },
        "teacher": {
            **result.teacher,
            "parameters": common.parameter_count(teacher_params),
            "checkpoint": os.path.relpath(teacher_checkpoint(teacher)),
        },
        "student_parameters": common.parameter_count(result.params["distilled"]),
        "steps": result.steps,
        "tokens_per_student": final["tokens"],
        "seconds_per_step": result.seconds_per_step,
        "seconds_per_step_note": "one step of both students (the teacher's forward pass "
        "included), no compilation, no evaluation",
        "train_seconds": result.train_seconds,
        "train_seconds_note": common.seconds_note(
            "wall time of distill.train in this process, compilation and evaluation included",
            result.resumed_from,
        ),
        "device": common.device_description(),
        "versions": common.library_versions(("tokenizers",)),
        "corpus": corpus.describe(),
        "config": config.to_dict(),
    }

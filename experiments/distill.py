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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
import distillation_training as distillation  # helper modules of the scripts
import text_corpus
from common import fraction, non_negative_float, positive_float, positive_int

OUTPUTS_WRITTEN_ATOMICALLY = (
    "metrics.json",
    "history.csv",
    "validation_loss.png",
    "training_loss.png",
)
# The flags of the students and the loss: (name, type or choices, help), or a flag several
# scripts share (common.SHARED_FLAGS); their defaults in DEFAULTS.
FLAGS = (
    ("student_d_model", positive_int, "width of the students"),
    ("student_layers", positive_int, "transformer blocks of a student"),
    ("student_heads", positive_int, "attention heads of a student; must divide --student-d-model"),
    (
        "student_d_ff",
        positive_int,
        "hidden width of a student's MLPs; None: 4 x --student-d-model",
    ),
    (
        "divergence",
        distillation.DIVERGENCES,
        "how the distilled student's next-token distribution is pulled towards the "
        "teacher's: forward_kl KL(teacher || student), covers every token the teacher deems "
        "likely; reverse_kl KL(student || teacher), settles on the teacher's likeliest tokens; "
        "jsd the Jensen-Shannon divergence, weighted by --beta",
    ),
    (
        "temperature",
        positive_float,
        "both models' scores are divided by it before the softmax: above 1 flattens the "
        "teacher's distribution, so its ranking of unlikely tokens counts more (the divergence "
        "is multiplied by its square, keeping the gradient's scale); a language model's "
        "next-token distribution is flat enough already at 1",
    ),
    (
        "hard_weight",
        non_negative_float,
        "weight of the ordinary cross-entropy on the true next tokens, added to the "
        "distillation term; 0: learn from the teacher alone",
    ),
    ("beta", fraction, "--divergence jsd only: the mixture's weight of the teacher"),
    *("steps", "learning_rate", "warmup_steps", "seed", "eval_every", "checkpoint_every"),
    ("batch_size", positive_int, "windows per step; None: the teacher's"),
    ("seq_len", positive_int, "tokens per window, at most the teacher's; None: the teacher's"),
    (
        "eval_batches",
        positive_int,
        "each evaluation reads this many batches of fixed windows of each split; None: "
        "the teacher's (so its loss matches its own metrics.json)",
    ),
)
DEFAULTS = dict(
    student_d_model=64,
    student_layers=1,
    student_heads=2,
    student_d_ff=None,
    divergence="forward_kl",
    temperature=1.0,
    hard_weight=0.5,
    beta=0.5,
    steps=150,
    batch_size=None,
    seq_len=None,
    learning_rate=3e-3,
    warmup_steps=15,
    seed=0,
    eval_every=25,
    eval_batches=None,
    checkpoint_every=50,
)


def build_parser() -> argparse.ArgumentParser:
    parser = common.script_parser(__doc__)
    parser.add_argument(
        "--teacher",
        default=distillation.DEFAULT_TEACHER,
        help="folder of the trained language model (its checkpoint.npz), the output of "
        "python experiments/language_model.py",
    )
    common.add_field_flags(parser, DEFAULTS, FLAGS)
    parser.add_argument(
        "--corpus-cache",
        default=text_corpus.default_cache_directory(),
        help="folder of the cached tokenizer and token streams (shared with language_model.py)",
    )
    common.add_output_flags(parser, "runs/distill", "output directory", "the two .png plots")
    return parser


def config_from_arguments(arguments, teacher, fingerprint: str):
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
    return distillation.DistillConfig(
        teacher=teacher,
        teacher_fingerprint=fingerprint,
        student=student,
        divergence=arguments.divergence,
        temperature=arguments.temperature,
        beta=arguments.beta,
        hard_weight=arguments.hard_weight,
    )


def load_inputs(parser: argparse.ArgumentParser, arguments: argparse.Namespace):
    """``(config, corpus, checkpoint)`` (:func:`common.checkpoint_to_resume`) of the run the
    flags ask for; flags that contradict each other and a missing teacher are usage errors
    (exit status 2), found before any work, reported under the flag's name."""
    try:
        teacher, teacher_corpus, fingerprint = distillation.read_teacher(arguments.teacher)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"argument --teacher: {error}")
    try:
        config = config_from_arguments(arguments, teacher, fingerprint)
    except ValueError as error:
        parser.error(str(error))
    common.check_output_directory(parser, arguments.out)
    checkpoint = common.checkpoint_to_resume(  # the teacher's tokens
        parser,
        arguments,
        lambda path: distillation.lm_training.check_checkpoint(path, config, teacher_corpus),
    )
    corpus = text_corpus.load(
        teacher.vocab_size,
        validation_fraction=teacher.validation_fraction,
        max_files=teacher.max_files,
        cache_directory=arguments.corpus_cache,
    )
    if corpus.fingerprint != teacher_corpus:
        parser.error(
            f"argument --teacher: the teacher in {arguments.teacher} was trained on other tokens "
            "(another Python's standard library, or another tokenizer); train it again here"
        )
    return config, corpus, checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = common.parse_flags(parser, argv)
    config, corpus, checkpoint = load_inputs(parser, arguments)
    student, teacher = config.student, config.teacher
    print(f"device: {common.device_description()}")
    print(
        f"teacher: {distillation.layers(teacher)}, d = {teacher.d_model}, trained "
        f"{teacher.steps} steps ({arguments.teacher}); students: "
        f"{distillation.layers(student)}, d = {student.d_model}, vocabulary {corpus.vocab_size}"
    )
    common.start_output(arguments, OUTPUTS_WRITTEN_ATOMICALLY, checkpoint)
    teacher_params = distillation.load_teacher_params(arguments.teacher, teacher, corpus.vocab_size)
    result = common.train_with_progress(
        functools.partial(distillation.train, config, corpus, teacher_params),
        arguments,
        student.steps,
        lambda row: {
            "distilled": f"{row['distilled_validation_loss']:.3f}",
            "labels_only": f"{row['labels_only_validation_loss']:.3f}",
        },
        initial=checkpoint[1] or 0,
    )
    if result is None:  # stopped on a non-finite value
        return 2
    metrics = distillation.metrics(config, result, teacher_params, arguments.teacher, corpus)
    common.write_json(os.path.join(arguments.out, "metrics.json"), metrics)
    common.write_history(os.path.join(arguments.out, "history.csv"), result.history)
    written = ["metrics.json", "history.csv"]
    if student.checkpoint_every:
        written.append(distillation.lm_training.CHECKPOINT_FILENAME)
    if not arguments.no_plots:
        distillation.plot(arguments.out, result.history, result.teacher, distillation.title(config))
        written += ["validation_loss.png", "training_loss.png"]
    print(metrics["finding"])
    print(
        f"{result.steps} steps in {result.train_seconds:.1f} s "
        f"({result.seconds_per_step:.3f} s per step of both students)"
    )
    common.report_written(arguments.out, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())

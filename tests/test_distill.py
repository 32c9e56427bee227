"""The distillation experiment (experiments/distill.py) with a tiny teacher and tiny students.

The corpus is the first 12 files of the standard library with a 300-token byte-pair encoding
(as in tests/test_language_model.py); the teacher, one layer of width 16, is written as a
checkpoint straight from its initialisation (the script never trains it, so its training does
not matter here), and the students are one layer of width 8. The runs of one worker share the
compiled step (``distillation_training.compiled_functions`` is cached per config).
"""

import csv
import dataclasses
import functools
import json
import pathlib
import sys

import checkpoints
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import distill  # noqa: E402
import distillation_training  # noqa: E402
import lm_training  # noqa: E402
import text_corpus  # noqa: E402

TINY_CORPUS = {"vocab_size": 300, "max_files": 12, "validation_fraction": 0.25}
TEACHER = lm_training.LMConfig(
    **TINY_CORPUS, d_model=16, num_layers=1, num_heads=2, seq_len=16, batch_size=4,
    eval_batches=1, steps=1,
)  # fmt: skip
STUDENT_FLAGS = [
    *("--student-d-model", "8", "--student-layers", "1", "--student-heads", "2"),
    *("--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--warmup-steps", "0"),
    *("--lr", "1e-2", "--no-progress", "--no-compilation-cache"),
]
TIMING_COLUMNS = ("run_seconds", "tokens_per_second")


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus-cache"))


@pytest.fixture(scope="module")
def corpus(corpus_cache):
    return text_corpus.load(**TINY_CORPUS, cache_directory=corpus_cache, on_progress=None)


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):
    """A folder holding the tiny teacher's checkpoint, as language_model.py writes it."""
    folder = tmp_path_factory.mktemp("teacher")
    with jax.numpy_dtype_promotion("standard"):
        state = lm_training.compiled_functions(TEACHER, corpus.vocab_size)["init"]()
    path = str(folder / lm_training.CHECKPOINT_FILENAME)
    lm_training.save_checkpoint(path, state, [], TEACHER, corpus.fingerprint)
    return str(folder)


def flags(teacher, corpus_cache, out):
    return [*STUDENT_FLAGS, "--teacher", teacher, "--corpus-cache", corpus_cache, "--out", out]


def read_history(path):
    with open(path, newline="") as file:
        return [
            {k: v for k, v in row.items() if k not in TIMING_COLUMNS}
            for row in csv.DictReader(file)
        ]


def test_a_tiny_run_writes_its_outputs_and_an_interrupted_run_resumes_losing_nothing(
    corpus, corpus_cache, teacher, tmp_path, capsys, monkeypatch, standard_promotion
):
    # Each script run lists the standard library's files again (0.7 s of walking folders).
    listed = functools.cache(text_corpus.standard_library_files)
    monkeypatch.setattr(text_corpus, "standard_library_files", listed)
    whole = tmp_path / "whole"
    assert distill.main(flags(teacher, corpus_cache, str(whole))) == 0
    assert "wrote " in capsys.readouterr().out
    metrics = json.loads((whole / "metrics.json").read_text())
    history = read_history(whole / "history.csv")
    assert [int(row["step"]) for row in history] == [0, 2, 4]
    for name in distillation_training.STUDENTS:
        assert float(history[-1][f"{name}_validation_loss"]) < float(
            history[0][f"{name}_validation_loss"]
        )
        assert metrics["students"][name]["validation_loss"] == pytest.approx(
            float(history[-1][f"{name}_validation_loss"])
        )
    # the same start: both students' first row is one evaluation of the same weights
    first = {name: {} for name in distillation_training.STUDENTS}
    for key, value in history[0].items():
        for name in distillation_training.STUDENTS:
            if key.startswith(name + "_"):
                first[name][key.removeprefix(name + "_")] = value
    assert first["distilled"] == first["labels_only"] and len(first["distilled"]) == 7
    assert metrics["difference"] == pytest.approx(
        metrics["labels_only_validation_loss"] - metrics["distilled_validation_loss"]
    )
    assert metrics["teacher"]["validation_loss"] == metrics["teacher_validation_loss"] > 0
    assert metrics["config"]["teacher"] == TEACHER.to_dict()
    assert metrics["steps"] == 4 and "distill" in metrics["finding"]
    for name in ("validation_loss.png", "training_loss.png"):
        assert (whole / name).read_bytes().startswith(b"\x89PNG")

    # The same run stopped after its first checkpoint (step 2), then resumed by the script.
    interrupted = tmp_path / "interrupted"
    arguments = distill.build_parser().parse_args(flags(teacher, corpus_cache, str(interrupted)))
    teacher_config, _, fingerprint = distillation_training.read_teacher(teacher)
    config = distill.config_from_arguments(arguments, teacher_config, fingerprint)
    teacher_params = distillation_training.load_teacher_params(
        teacher, teacher_config, corpus.vocab_size
    )

    def stop(row, steps_in_run):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distillation_training.train(
            config, corpus, teacher_params, checkpoint_dir=str(interrupted), on_run_end=stop
        )
    resumed_flags = [*flags(teacher, corpus_cache, str(interrupted)), "--resume", "--no-plots"]
    assert distill.main(resumed_flags) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert read_history(interrupted / "history.csv") == history
    checkpoints.assert_same_parameters(whole, interrupted)

    # Resuming with another distillation setting is refused before any work, naming the flag.
    with pytest.raises(SystemExit) as exit_info:
        distill.main([*resumed_flags, "--temperature", "3"])
    assert exit_info.value.code == 2
    assert "argument --resume:" in capsys.readouterr().err


def test_the_distilled_objective_is_the_tempered_divergence_plus_the_weighted_labels_loss(
    corpus, corpus_cache, teacher, standard_promotion
):
    arguments = distill.build_parser().parse_args(flags(teacher, corpus_cache, "unused"))
    teacher_config, _, fingerprint = distillation_training.read_teacher(teacher)
    config = distill.config_from_arguments(arguments, teacher_config, fingerprint)
    assert config.student.d_model == 8 and config.student.seq_len == TEACHER.seq_len
    assert config.student.vocab_size == TEACHER.vocab_size and config.student.z_loss == 0
    teacher_params = distillation_training.load_teacher_params(
        teacher, teacher_config, corpus.vocab_size
    )
    student, _ = distillation_training.compiled_functions(config, corpus.vocab_size)["init"]()
    windows = jnp.asarray(lm_training.evaluation_windows(config.student, corpus.train_tokens)[0])

    @jax.jit
    def objectives_and_logits(student, teacher_params):
        params = {"distilled": student, "labels_only": student}
        logits = [
            distillation_training.transformer.logits(p, windows[:, :-1], num_heads=2)
            for p in (student, teacher_params)
        ]
        tempered = dataclasses.replace(config, temperature=2.0, hard_weight=0.25)
        return distillation_training.objectives(tempered, params, teacher_params, windows), logits

    (total, losses), logits = objectives_and_logits(student, teacher_params)

    def log_softmax(z):
        z = np.asarray(z, np.float64).reshape(-1, corpus.vocab_size)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    labels = np.asarray(windows[:, 1:]).reshape(-1)
    log_s, log_t = (log_softmax(z / 2) for z in logits)
    divergence = np.mean(np.sum(np.exp(log_t) * (log_t - log_s), -1))
    cross_entropy = -np.mean(log_softmax(logits[0])[np.arange(labels.size), labels])
    np.testing.assert_allclose(float(losses["labels_only"]), cross_entropy, rtol=1e-5)
    expected = 2**2 * divergence + 0.25 * cross_entropy
    np.testing.assert_allclose(float(losses["distilled"]), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(total), expected + cross_entropy, rtol=1e-5)


def test_every_flag_shows_its_default():
    help_text = distill.build_parser().format_help()
    usage = help_text.partition("\n\n")[0]
    options = {flag for flag in usage.split() if flag.startswith("[--")} - {"[-h]"}
    assert options and help_text.count("(default:") == len(options)


@pytest.mark.parametrize(
    "bad, named",
    [
        (["--student-heads", "3"], "argument --student-heads:"),
        (["--temperature", "0"], "argument --temperature:"),
        (["--divergence", "kl"], "argument --divergence:"),
        (["--beta", "1", "--divergence", "jsd"], "argument --beta:"),
        (["--beta", "0.3"], "argument --beta:"),
        (["--checkpoint-every", "3"], "argument --checkpoint-every:"),
        (["--seq-len", "17"], "argument --seq-len:"),
        (["--teacher", "MISSING"], "python experiments/language_model.py --out"),
    ],
)
def test_bad_flags_and_a_missing_teacher_are_one_line_errors_before_any_work(
    bad, named, teacher, capsys, tmp_path
):
    if bad == ["--teacher", "MISSING"]:
        bad = ["--teacher", str(tmp_path / "no-teacher")]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        distill.main([*STUDENT_FLAGS, "--teacher", teacher, *bad, "--out", str(out)])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], lines
    assert not out.exists()

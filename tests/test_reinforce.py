"""The reinforcement-learning experiment (experiments/reinforce.py) with a tiny model.

The corpus is the first 12 files of the standard library with a 300-token byte-pair encoding
(as in tests/test_language_model.py); the model, one layer of width 32, is written as a
checkpoint straight from its initialisation (the script fine-tunes whatever it is given), and a
run is two steps of 2 prompts x 2 completions of 4 tokens. At width 16 the fused
log-probabilities of a row agree between these batch sizes even without their batch-invariant
mode, and the on-policy checks would pass without it; at 32 they fail without it. Nothing is
written into the user's cache: the corpus is cached in a temporary folder and the compilation
cache is off.
"""

import csv
import functools
import json
import pathlib
import sys

import checkpoints
import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import grpo_training  # noqa: E402
import lm_training  # noqa: E402
import python_lines  # noqa: E402
import reinforce  # noqa: E402
import text_corpus  # noqa: E402

TINY_CORPUS = {"vocab_size": 300, "max_files": 12, "validation_fraction": 0.25}
MODEL = lm_training.LMConfig(
    **TINY_CORPUS, d_model=32, num_layers=1, num_heads=2, seq_len=16, batch_size=4,
    eval_batches=1, steps=1,
)  # fmt: skip
RUN_FLAGS = [
    *("--steps", "2", "--eval-every", "1", "--checkpoint-every", "1"),
    *("--prompts-per-step", "2", "--group-size", "2", "--prompt-tokens", "8"),
    *("--max-new-tokens", "4", "--train-prompts", "8", "--eval-prompts", "2"),
    *("--lr", "1e-2", "--compare-rounds", "0", "--no-progress", "--no-compilation-cache"),
]
TIMING_COLUMNS = ("run_seconds", "sample_seconds", "update_seconds")


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus-cache"))


@pytest.fixture(scope="module")
def corpus(corpus_cache):
    return text_corpus.load(**TINY_CORPUS, cache_directory=corpus_cache, on_progress=None)


@pytest.fixture(scope="module")
def model(corpus, tmp_path_factory):
    """A folder holding the tiny model's checkpoint, as language_model.py writes it."""
    folder = tmp_path_factory.mktemp("model")
    with jax.numpy_dtype_promotion("standard"):
        state = lm_training.compiled_functions(MODEL, corpus.vocab_size)["init"]()
    path = str(folder / lm_training.CHECKPOINT_FILENAME)
    lm_training.save_checkpoint(path, state, [], MODEL, corpus.fingerprint)
    return str(folder)


def read_history(path):
    with open(path, newline="") as file:
        return [
            {k: v for k, v in row.items() if k not in TIMING_COLUMNS}
            for row in csv.DictReader(file)
        ]


@pytest.mark.parametrize(
    "line, valid",
    [
        ("x = f(a, b)", True),
        ("        return self._cache[key]", True),  # indented, outside a function: syntax only
        ("def area(self):", True),  # a block's header, with `pass` as its body
        ("for i in range(3):  # count", True),
        ("# a comment", True),
        ("x = f(a, b", False),  # a bracket left open
        ("else:", False),  # a clause needs the block before it
        ("@property", False),
        ("x = = 1", False),
        ("   ", False),
    ],
)
def test_the_reward_of_known_lines(line, valid):
    assert python_lines.is_python_line(line) is valid
    head, completion = line[:3], line[3:] + "\n    y = 1\n"  # the text after the break is cut
    assert python_lines.completed_line(head, completion) == line
    assert python_lines.line_reward(head, completion, ended=True) == float(valid)
    assert python_lines.line_reward(head, completion, ended=False) == 0.0


def test_a_tiny_run_is_exactly_on_policy_and_an_interrupted_run_resumes_losing_nothing(
    corpus, corpus_cache, model, tmp_path, capsys, monkeypatch, standard_promotion
):
    # Each script run lists the standard library's files again (0.7 s of walking folders).
    listed = functools.cache(text_corpus.standard_library_files)
    monkeypatch.setattr(text_corpus, "standard_library_files", listed)
    flags = [*RUN_FLAGS, "--model", model, "--corpus-cache", corpus_cache]
    whole = tmp_path / "whole"
    assert reinforce.main([*flags, "--out", str(whole)]) == 0
    assert "exactly 1" in capsys.readouterr().out
    metrics = json.loads((whole / "metrics.json").read_text())
    history = read_history(whole / "history.csv")
    assert [int(row["step"]) for row in history] == [0, 1, 2]
    # The sampler's log-probabilities are the trainer's, bit for bit: every first update's
    # ratio is 1.0 exactly.
    assert metrics["first_update_ratio"] | {"note": None} == {
        "min": 1.0, "max": 1.0, "exactly_one": True, "note": None
    }  # fmt: skip
    for row in history[1:]:
        assert float(row["first_ratio_min"]) == float(row["first_ratio_max"]) == 1.0
    assert metrics["heldout_before"]["validation_loss"] == float(history[0]["validation_loss"])
    assert metrics["config"]["model"] == MODEL.to_dict() and metrics["steps"] == 2
    for name in ("reward.png", "entropy_kl.png"):
        assert (whole / name).read_bytes().startswith(b"\x89PNG")

    # Every prompt's line is valid as the file has it, and not at the cut.
    arguments = reinforce.build_parser().parse_args([*flags, "--out", str(tmp_path / "unused")])
    config, _, _ = reinforce.load_inputs(reinforce.build_parser(), arguments)
    task = grpo_training.make_task(config, corpus)
    for prompts in (task.train, task.held_out):
        for tokens, head, rest in zip(prompts.tokens, prompts.heads, prompts.rests, strict=True):
            assert task.tokenizer.decode(tokens.tolist()).endswith(head)
            assert python_lines.is_python_line(head + rest)
            assert head.strip() and not python_lines.is_python_line(head)

    # The sampler's log-probabilities, drawn a token at a time, are those of the whole
    # completions scored at once, bit for bit, at every position.
    params = lm_training.load_params(f"{model}/checkpoint.npz", MODEL, corpus.vocab_size)
    functions = grpo_training.functions_for(config, task)
    prompts = grpo_training.in_groups(config, task.train.tokens[:2])
    completions = functions["sample"](params, prompts, jax.random.key(1))
    scored, _ = functions["score"](params, prompts, completions.tokens)
    np.testing.assert_array_equal(np.asarray(scored), np.asarray(completions.log_probs))

    # The same run stopped after its first checkpoint (step 1), then resumed by the script.
    interrupted = tmp_path / "interrupted"

    def stop(row, steps_in_run):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        grpo_training.train(
            config, corpus, task, params, checkpoint_dir=str(interrupted), on_run_end=stop
        )
    resumed = [*flags, "--out", str(interrupted), "--resume", "--no-plots"]
    assert reinforce.main(resumed) == 0
    assert "resuming from step 1" in capsys.readouterr().out
    assert read_history(interrupted / "history.csv") == history
    checkpoints.assert_same_parameters(whole, interrupted)

    # Resuming with another setting is refused before any work, naming the flag.
    with pytest.raises(SystemExit) as exit_info:
        reinforce.main([*resumed, "--temperature", "0.5"])
    assert exit_info.value.code == 2
    assert "argument --resume:" in capsys.readouterr().err


def test_every_flag_shows_its_default_and_bad_flags_are_one_line_errors(model, capsys, tmp_path):
    help_text = reinforce.build_parser().format_help()
    usage = help_text.partition("\n\n")[0]
    options = {flag for flag in usage.split() if flag.startswith("[--")} - {"[-h]"}
    assert options and help_text.count("(default:") == len(options)
    assert "seed" not in help_text.replace("--seed", "")
    for bad, named in (
        (["--max-new-tokens", "12"], "argument --max-new-tokens:"),  # past the positions
        (["--eval-prompts", "3"], "argument --eval-prompts:"),
        (["--group-size", "1"], "argument --group-size:"),
        (["--model", str(tmp_path / "none")], "python experiments/language_model.py --out"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            reinforce.main([*RUN_FLAGS, "--model", model, *bad, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and named in lines[0], lines
    assert not (tmp_path / "out").exists()

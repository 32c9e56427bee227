"""The preference experiment (experiments/preference.py) with a tiny model.

The corpus is the first 12 files of the standard library with a 300-token byte-pair encoding
(as in tests/test_reinforce.py); the model, one layer of width 32, is written as a checkpoint
straight from its initialisation (the script tunes whatever it is given), and a run is two
steps of 2 pairs, responses of 4 tokens after prompts of 8. Nothing is written into the
user's cache: the corpus is cached in a temporary folder and the compilation cache is off.
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
import lm_training  # noqa: E402
import preference  # noqa: E402
import preference_pairs  # noqa: E402
import preference_training  # noqa: E402
import text_corpus  # noqa: E402

# One worker runs them all: they share the tiny model, its pairs and the compiled programs.
pytestmark = pytest.mark.xdist_group("preference_experiment")
TINY_CORPUS = {"vocab_size": 300, "max_files": 12, "validation_fraction": 0.25}
MODEL = lm_training.LMConfig(
    **TINY_CORPUS, d_model=32, num_layers=1, num_heads=2, seq_len=16, batch_size=4,
    eval_batches=1, steps=1,
)  # fmt: skip
RUN_FLAGS = [
    *("--steps", "2", "--eval-every", "1", "--checkpoint-every", "1"),
    *("--pairs-per-step", "2", "--prompt-tokens", "8", "--response-tokens", "4"),
    *("--train-pairs", "4", "--eval-pairs", "2", "--rejected", "mix"),
    *("--lr", "1e-2", "--compare-rounds", "0", "--no-progress", "--no-compilation-cache"),
]


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
            {k: v for k, v in row.items() if k != "run_seconds"} for row in csv.DictReader(file)
        ]


def test_pairs_are_windows_of_one_file_with_a_different_rejected_response(corpus):
    from tokenizers import Tokenizer

    stream = corpus.validation_tokens
    end = Tokenizer.from_file(corpus.tokenizer_path).token_to_id(text_corpus.END_OF_TEXT)
    sample = lambda prompts, key: np.zeros((len(prompts), 4), np.int32)  # a stand-in model
    pairs = preference_pairs.make_pairs(
        stream, count=6, prompt_tokens=8, response_tokens=4, rejected="mix", end_of_text=end,
        seed=3, sample=sample,
    )  # fmt: skip
    assert pairs.prompts.shape == (6, 8) and pairs.chosen.shape == pairs.rejected.shape == (6, 4)
    np.testing.assert_array_equal(pairs.sampled, [True, False] * 3)
    np.testing.assert_array_equal(pairs.rejected[pairs.sampled], 0)
    windows = np.concatenate([pairs.prompts, pairs.chosen], axis=1)
    every_window = np.lib.stride_tricks.sliding_window_view(stream, 12)
    for window, rejected, sampled in zip(windows, pairs.rejected, pairs.sampled, strict=True):
        assert np.all(every_window == window, axis=1).any()  # cut from the stream
        assert end not in window  # within one file
        if not sampled:  # the same tokens in another order
            assert sorted(rejected) == sorted(window[8:]) and list(rejected) != list(window[8:])
    again = preference_pairs.make_pairs(
        stream, count=6, prompt_tokens=8, response_tokens=4, rejected="mix", end_of_text=end,
        seed=3, sample=sample,
    )  # fmt: skip
    for one, two in zip(pairs, again, strict=True):
        np.testing.assert_array_equal(one, two)


def test_the_fused_and_naive_losses_agree_in_value_and_gradient(corpus, model):
    arguments = preference.build_parser().parse_args([*RUN_FLAGS, "--model", model])
    fields = preference.common.fields_of(arguments, preference.FLAGS)
    config = preference_training.PreferenceConfig(model=MODEL, model_fingerprint="", **fields)
    params = lm_training.load_params(f"{model}/checkpoint.npz", MODEL, corpus.vocab_size)
    random = np.random.default_rng(0)
    tokens = lambda *shape: random.integers(0, corpus.vocab_size, shape).astype(np.int32)
    pairs = preference_pairs.Pairs(tokens(3, 8), tokens(3, 4), tokens(3, 4), np.ones(3, bool))
    batch = preference_training.pair_batch(pairs, np.array([2, 0]))
    states = jax.jit(functools.partial(preference_training.response_states, config))(
        params, batch.inputs
    )
    classifier = preference_training.transformer.classifier(params)
    # The policy away from the reference, so that the rewards are not all zero.
    keys = jax.random.split(jax.random.key(0), 2)
    policy = (
        states + 0.5 * jax.random.normal(keys[0], states.shape),
        classifier + 0.1 * jax.random.normal(keys[1], classifier.shape),
    )
    results = {}
    for loss in preference_training.LOSSES:
        objective = lambda hidden, classifier, loss=loss: preference_training.states_objective(
            config, loss, hidden, classifier, states, classifier, batch
        )
        gradient = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
        results[loss] = jax.jit(gradient)(*policy)
    (fused_loss, fused_metrics), fused_grads = results["fused"]
    (naive_loss, naive_metrics), naive_grads = results["naive"]
    assert abs(float(fused_loss) - np.log(2)) > 1e-3  # the rewards differ
    np.testing.assert_allclose(fused_loss, naive_loss, rtol=1e-5, atol=1e-6)
    for name in ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"):
        np.testing.assert_allclose(
            getattr(fused_metrics, name), getattr(naive_metrics, name), rtol=1e-5, atol=1e-6
        )
    for fused, naive in zip(fused_grads, naive_grads, strict=True):
        assert np.abs(np.asarray(fused)).max() > 0
        np.testing.assert_allclose(fused, naive, rtol=1e-4, atol=1e-6)


def test_a_tiny_run_and_an_interrupted_run_resumes_losing_nothing(
    corpus, corpus_cache, model, tmp_path, capsys, monkeypatch, standard_promotion
):
    # Each script run lists the standard library's files again (0.7 s of walking folders).
    listed = functools.cache(text_corpus.standard_library_files)
    monkeypatch.setattr(text_corpus, "standard_library_files", listed)
    flags = [*RUN_FLAGS, "--model", model, "--corpus-cache", corpus_cache]
    whole = tmp_path / "whole"
    assert preference.main([*flags, "--out", str(whole)]) == 0
    metrics = json.loads((whole / "metrics.json").read_text())
    history = read_history(whole / "history.csv")
    assert [int(row["step"]) for row in history] == [0, 1, 2]
    # Before training the policy is the reference: every reward is 0, no pair is won.
    assert metrics["heldout_before"]["reward_accuracy"] == 0.0
    assert metrics["heldout_before"]["reward_margin"] == 0.0
    assert metrics["heldout_before"]["validation_loss"] == float(history[0]["validation_loss"])
    assert metrics["config"]["model"] == MODEL.to_dict() and metrics["steps"] == 2
    assert metrics["pairs"]["train"]["sampled_rejected"] == 2
    assert len(metrics["examples"]) == 2
    for name in ("rewards.png", "log_probs.png"):
        assert (whole / name).read_bytes().startswith(b"\x89PNG")

    # The same run stopped after its first checkpoint (step 1), then resumed by the script.
    interrupted = tmp_path / "interrupted"
    arguments = preference.build_parser().parse_args([*flags, "--out", str(interrupted)])
    config, _, _ = preference.load_inputs(preference.build_parser(), arguments)
    params = lm_training.load_params(f"{model}/checkpoint.npz", MODEL, corpus.vocab_size)
    pairs = preference_training.make_pairs(config, corpus, params)

    def stop(row, steps_in_run):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preference_training.train(
            config, corpus, pairs, params, checkpoint_dir=str(interrupted), on_run_end=stop
        )
    resumed = [*flags, "--out", str(interrupted), "--resume", "--no-plots"]
    assert preference.main(resumed) == 0
    assert "resuming from step 1" in capsys.readouterr().out
    assert read_history(interrupted / "history.csv") == history
    checkpoints.assert_same_parameters(whole, interrupted)

    # Resuming with another setting is refused before any work, naming the flag.
    with pytest.raises(SystemExit) as exit_info:
        preference.main([*resumed, "--beta", "0.3"])
    assert exit_info.value.code == 2
    assert "argument --resume:" in capsys.readouterr().err


def test_every_flag_shows_its_default_and_bad_flags_are_one_line_errors(model, capsys, tmp_path):
    help_text = preference.build_parser().format_help()
    usage = help_text.partition("\n\n")[0]
    options = {flag for flag in usage.split() if flag.startswith("[--")} - {"[-h]"}
    assert options and help_text.count("(default:") == len(options)
    assert "seed" not in help_text.replace("--seed", "")
    for bad, named in (
        (["--response-tokens", "10"], "argument --response-tokens:"),  # past the positions
        (["--eval-pairs", "3"], "argument --eval-pairs:"),
        (["--label-smoothing", "0.5"], "argument --label-smoothing:"),
        (["--model", str(tmp_path / "none")], "python experiments/language_model.py --out"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            preference.main([*RUN_FLAGS, "--model", model, *bad, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and named in lines[0], lines
    assert not (tmp_path / "out").exists()

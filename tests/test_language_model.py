"""The language-model experiment (experiments/language_model.py) on a tiny corpus and model.

Every test uses the first 12 files of the standard library, a 300-token byte-pair encoding and
a one-layer transformer of width 16, so that the programs compile in seconds; the tests of one
worker share the compiled functions (``lm_training.compiled_functions`` is cached per config).
"""

import collections
import csv
import dataclasses
import json
import math
import pathlib
import sys

import checkpoints
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import language_model  # noqa: E402
import lm_training  # noqa: E402
import text_corpus  # noqa: E402
import transformer  # noqa: E402

TINY_CORPUS = {"vocab_size": 300, "max_files": 12, "validation_fraction": 0.25}
TINY = lm_training.LMConfig(
    **TINY_CORPUS,
    d_model=16,
    num_layers=1,
    num_heads=2,
    seq_len=16,
    batch_size=4,
    learning_rate=1e-2,
    warmup_steps=0,
    steps=4,
    eval_every=2,
    eval_batches=1,
    checkpoint_every=2,
)
TINY_FLAGS = [
    *language_model.flags_of(TINY),
    "--compare-steps",
    "0",
    "--no-progress",
    "--no-compilation-cache",
]
TIMING_COLUMNS = ("run_seconds", "tokens_per_second")


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus-cache"))


@pytest.fixture(scope="module")
def corpus(corpus_cache):
    return text_corpus.load(**TINY_CORPUS, cache_directory=corpus_cache, on_progress=None)


def read_history(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_tiny_run_writes_its_outputs_and_an_interrupted_run_resumes_losing_nothing(
    corpus, corpus_cache, tmp_path, capsys, standard_promotion
):
    whole = tmp_path / "whole"
    assert (
        language_model.main([*TINY_FLAGS, "--out", str(whole), "--corpus-cache", corpus_cache]) == 0
    )
    metrics = json.loads((whole / "metrics.json").read_text())
    history = read_history(whole / "history.csv")
    assert [int(row["step"]) for row in history] == [0, 2, 4]
    assert float(history[-1]["validation_loss"]) < float(history[0]["validation_loss"])
    assert metrics["validation_loss"] == pytest.approx(float(history[-1]["validation_loss"]))
    for name in ("validation_accuracy", "train_accuracy"):
        assert 0 <= metrics[name] <= 1
    assert metrics["step_temp_bytes"] > 0 and metrics["peak_memory_bytes"] > 2**20
    assert metrics["tokens_per_second"] > 0 and metrics["steps"] == 4
    assert metrics["tokens_trained"] == 4 * TINY.batch_size * TINY.seq_len
    assert metrics["config"] == TINY.to_dict() and metrics["comparison"] is None
    # the unigram entropy, counted independently
    counts = collections.Counter(corpus.train_tokens.tolist())
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert metrics["unigram_entropy"] == pytest.approx(entropy, rel=1e-9)
    for name in ("loss.png", "accuracy.png"):
        assert (whole / name).read_bytes().startswith(b"\x89PNG")
    assert "wrote " in capsys.readouterr().out

    # The same run stopped after its first checkpoint (step 2), then resumed.
    interrupted = tmp_path / "interrupted"

    def stop(row, steps_in_run):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lm_training.train(TINY, corpus, checkpoint_dir=str(interrupted), on_run_end=stop)
    flags = [*TINY_FLAGS, "--out", str(interrupted), "--corpus-cache", corpus_cache]
    assert language_model.main([*flags, "--resume"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    resumed = read_history(interrupted / "history.csv")
    for row, expected in zip(resumed, history, strict=True):
        assert {k: v for k, v in row.items() if k not in TIMING_COLUMNS} == {
            k: v for k, v in expected.items() if k not in TIMING_COLUMNS
        }
    checkpoints.assert_same_parameters(whole, interrupted)

    # Resuming with another model is refused before any work, naming the flag.
    with pytest.raises(SystemExit) as exit_info:
        language_model.main([*flags, "--d-model", "32", "--resume"])
    assert exit_info.value.code == 2
    assert "argument --resume:" in capsys.readouterr().err


def reference_statistics(logits, labels, z_loss):
    """Cross-entropy, z-loss, accuracy and entropy of float64 logits, by NumPy and optax."""
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    log_p = logits - lse[..., None]
    labels = np.asarray(labels)
    cross_entropy = jax.jit(optax.softmax_cross_entropy_with_integer_labels)(
        np.asarray(logits, np.float32), labels
    )
    return {
        "loss": float(np.mean(cross_entropy)),
        "z_loss": float(np.mean(z_loss * lse**2)),
        "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
        "entropy": float(np.mean(-np.sum(np.exp(log_p) * log_p, -1))),
    }


def test_naive_and_fused_training_agree_step_by_step(corpus, standard_promotion):
    configs = {loss: dataclasses.replace(TINY, loss=loss) for loss in lm_training.LOSSES}
    states, metrics = {}, {loss: [] for loss in configs}
    for loss, config in configs.items():
        functions = lm_training.compiled_functions(config, corpus.vocab_size)
        tokens = lm_training.place_tokens(functions["mesh"], corpus.train_tokens)
        state = functions["init"]()
        if loss == "naive":  # the first batch's statistics against an independent reference

            @jax.jit  # one program, not one per operation
            def first_batch(params, tokens, config=config):
                starts = lm_training.window_starts(config, tokens.shape[0], jnp.asarray(0))
                windows = lm_training.gather_windows(tokens, starts, config.seq_len + 1)
                return transformer.logits(params, windows[:, :-1], num_heads=2), windows[:, 1:]

            expected = reference_statistics(*first_batch(state.params, tokens), config.z_loss)
        step = lm_training.compile_step(functions, state, tokens)
        for _ in range(3):
            state, step_metrics = step(state, tokens)
            metrics[loss].append(jax.device_get(step_metrics))
        states[loss] = state
    for name, value in expected.items():
        assert float(metrics["naive"][0][name]) == pytest.approx(value, rel=1e-5, abs=1e-6)
    for naive, fused in zip(metrics["naive"], metrics["fused"], strict=True):
        for name in lm_training.METRICS:
            assert float(fused[name]) == pytest.approx(float(naive[name]), rel=1e-5, abs=1e-6)
    assert int(states["fused"].step) == int(states["naive"].step) == 3
    initial = jax.jit(  # one program, not one per parameter and operation
        lambda key: transformer.init(
            key, vocab_size=corpus.vocab_size, d_model=16, num_layers=1, max_len=16
        )
    )(jax.random.fold_in(jax.random.key(TINY.seed), 0))
    moved = jax.tree.map(  # in NumPy: no program per parameter shape
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        states["naive"].params,
        initial,
    )
    assert min(jax.tree.leaves(moved)) > 0  # every parameter trained
    # The key bias's gradient is 0 in exact arithmetic (softmax ignores a constant added to
    # a row's scores), so its updates are rounding noise scaled by Adam's normalisation: it is
    # held to the scale of the updates, lr per step, and every other parameter to rounding.
    width = TINY.d_model
    naive_leaves, fused_leaves = (
        jax.tree_util.tree_leaves_with_path(states[loss].params) for loss in ("naive", "fused")
    )
    for (path, naive), (_, fused) in zip(naive_leaves, fused_leaves, strict=True):
        naive, fused = np.asarray(naive), np.asarray(fused)
        if jax.tree_util.keystr(path).endswith("['qkv']['b']"):
            key_bias = slice(width, 2 * width)
            np.testing.assert_allclose(
                fused[key_bias], naive[key_bias], atol=3 * TINY.learning_rate
            )
            naive, fused = np.delete(naive, key_bias), np.delete(fused, key_bias)
        np.testing.assert_allclose(fused, naive, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_the_causal_mask_hides_later_tokens():
    params = jax.jit(  # one program, not one per parameter and operation
        lambda key: transformer.init(key, vocab_size=20, d_model=8, num_layers=2, max_len=6)
    )(jax.random.key(0))
    tokens = np.array([[1, 2, 3, 4, 5, 6]], np.int32)
    changed = tokens.copy()
    changed[0, 4] = 7
    hidden_states = jax.jit(transformer.hidden_states, static_argnames="num_heads")
    one, two = (np.asarray(hidden_states(params, t, num_heads=2)) for t in (tokens, changed))
    np.testing.assert_array_equal(one[0, :4], two[0, :4])
    assert not np.allclose(one[0, 4:], two[0, 4:])


def test_the_corpus_splits_by_files_and_is_read_back_from_its_cache(
    corpus, corpus_cache, monkeypatch
):
    files = text_corpus.standard_library_files()[: TINY_CORPUS["max_files"]]
    held_out = [f.name for f in files if text_corpus.in_validation_split(f.name, 0.25)]
    assert 0 < corpus.validation_files == len(held_out) < len(files)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(corpus.tokenizer_path)
    end_id = tokenizer.token_to_id(text_corpus.END_OF_TEXT)
    # the end-of-text token closes every file, and decoding gives the file back
    assert np.sum(corpus.validation_tokens == end_id) == corpus.validation_files
    first_held_out = next(f for f in files if f.name in held_out).path.read_text()
    first_ids = corpus.validation_tokens[: int(np.argmax(corpus.validation_tokens == end_id))]
    assert tokenizer.decode(first_ids.tolist()) == first_held_out
    monkeypatch.setattr(
        text_corpus, "train_tokenizer", lambda *a: pytest.fail("trained the tokenizer again")
    )
    again = text_corpus.load(**TINY_CORPUS, cache_directory=corpus_cache, on_progress=None)
    assert again.fingerprint == corpus.fingerprint


def test_every_flag_shows_its_default_and_flags_of_gives_back_the_config():
    help_text = language_model.build_parser().format_help()
    usage = help_text.partition("\n\n")[0]
    flags = {flag for flag in usage.split() if flag.startswith("[--")} - {"[-h]"}
    assert flags and help_text.count("(default:") == len(flags)
    config = dataclasses.replace(TINY, tied=False, d_ff=24, devices=1, loss="naive")
    parsed = language_model.build_parser().parse_args(language_model.flags_of(config))
    assert language_model.config_from_arguments(parsed) == config


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--num-heads", "3"], "argument --num-heads:"),
        (["--lr", "-1"], "argument --lr:"),
        (["--vocab-size", "100"], "argument --vocab-size:"),
        (["--vocab-shards", "2", "--loss", "naive"], "argument --vocab-shards:"),
        (["--devices", "64"], "argument --devices:"),
        (["--eval-every", "3"], "argument --checkpoint-every:"),
    ],
)
def test_bad_flags_are_one_line_usage_errors_before_any_work(flags, named, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        language_model.main([*flags, "--out", str(tmp_path / "out"), "--no-compilation-cache"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_the_comparison_runs_each_loss_with_the_same_settings(tmp_path, monkeypatch, capsys):
    config = dataclasses.replace(TINY, steps=100)
    arguments = language_model.build_parser().parse_args(
        [*language_model.flags_of(config), "--corpus-cache", "cache"]
    )
    commands = []

    def fake_run(command, **_):
        commands.append(command)
        child = language_model.build_parser().parse_args(command[2:])
        measured = {"naive": 4.0, "fused": 1.0}[child.loss]
        metrics = {
            "step_temp_bytes": measured * 2**20,
            "peak_memory_bytes": measured * 2**30,
            "tokens_per_second": 1500 / measured,
            "validation_loss": 5.0,
            "devices": {"batch": 1, "vocab": 1},
            "config": language_model.config_from_arguments(child).to_dict(),
        }
        out = pathlib.Path(child.out)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(metrics))
        rows = [(0, ""), (2, 2000 / measured), (5, 1000 / measured)]  # tokens/s: the last row's
        history = "step,tokens_per_second\n" + "".join(f"{s},{t}\n" for s, t in rows)
        (out / "history.csv").write_text(history)
        return language_model.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(language_model.subprocess, "run", fake_run)
    comparison = language_model.compare_losses(config, arguments, 5, str(tmp_path))
    assert len(commands) == 2
    for loss in ("naive", "fused"):
        child = language_model.build_parser().parse_args(
            commands[("naive", "fused").index(loss)][2:]
        )
        expected = dataclasses.replace(
            config, loss=loss, steps=5, eval_every=2, checkpoint_every=0, eval_batches=1
        )
        assert language_model.config_from_arguments(child) == expected
    assert comparison["naive"]["step_temp_bytes"] == 4 * 2**20
    assert comparison["fused"]["tokens_per_second"] == 1000 and comparison["timed_steps"] == 3
    table = language_model.comparison_table(comparison)
    assert "4.0 MiB" in table and "0.250" in table
    # run again: both runs are read back, none is started
    monkeypatch.setattr(language_model.subprocess, "run", lambda *a, **k: pytest.fail("reran"))
    assert language_model.compare_losses(config, arguments, 5, str(tmp_path)) == comparison

"""The benchmark script: its quick run end to end, its round orders, resuming a run, and the
largest shape an accelerator's memory allows."""

import collections
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# This module empties JAX's caches (plain_path_only, jax.clear_caches, the benchmark's cold
# runs), after which every test of the same worker compiles its programs again: its tests run
# together on one worker (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("empties_jax_caches")


def load_benchmark():
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmark.py")
    spec = importlib.util.spec_from_file_location("benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def memoized_compiled_memory():
    """harness.compiled_memory that compiles each distinct program once: keyed on the lowered
    program's text, so the same program asked for again (by a test's reference, then by the
    function under test) gives the same ``memory_analysis()`` without compiling it anew."""
    compiled = {}

    def compiled_memory(fn, *args):
        lowered = jax.jit(fn).lower(*args)
        text = lowered.as_text()
        if text not in compiled:
            compiled[text] = lowered.compile().memory_analysis()
        return compiled[text]

    return compiled_memory


@pytest.mark.longest
def test_benchmark_quick_run(tmp_path):
    benchmark = load_benchmark()
    rows = benchmark.main(["--quick", "--out", str(tmp_path), "--repeats", "1"])
    assert {r["case"] for r in rows} == {1, 2, 3}
    disagree = [r for r in rows if not r.get("agree", True)]
    assert not disagree, disagree
    # Case 2's timed row compared the fused loss, method="recompute" and the [d, V] layout with
    # the naive path and found them equal (the check that finds a wrong one:
    # test_case_two_checks_both_methods_against_the_naive_path).
    (timed,) = [r for r in rows if r["case"] == 2 and r["kind"] == "time"]
    assert timed["agree"] is True
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["meta"]["quick"] is True
    assert (tmp_path / "results.md").read_text().startswith("# Benchmarks")
    assert (tmp_path / "chart.png").stat().st_size > 0
    assert sorted(os.listdir(tmp_path)) == ["chart.png", "results.json", "results.md"]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_every_competitor_follows_every_other_equally_often(n):
    names = [f"competitor {i}" for i in range(n)]
    rounds = n if n % 2 == 0 else 2 * n
    orders = load_benchmark().round_orders(names, rounds)
    assert len(orders) == rounds and all(sorted(order) == names for order in orders)
    follows = collections.Counter(pair for order in orders for pair in zip(order, order[1:]))
    expected = 1 if n % 2 == 0 else 2
    assert follows == {(a, b): expected for a in names for b in names if a != b}


def test_an_interrupted_run_resumes_with_its_finished_cases(tmp_path):
    benchmark = load_benchmark()
    settings = {"quick": True}
    calls = []

    def case(name, fail=False):
        def run():
            calls.append(name)
            if fail:
                raise KeyboardInterrupt
            return [{"case": name, "seconds": {"x": 0.5}}]

        return run

    with pytest.raises(KeyboardInterrupt):
        benchmark.run_cases(str(tmp_path), settings, [("a", case("a")), ("b", case("b", True))])
    assert calls == ["a", "b"]
    saved = json.loads((tmp_path / benchmark.harness.PARTIAL_RESULTS).read_text())
    assert list(saved["cases"]) == ["a"]

    rows = benchmark.run_cases(str(tmp_path), settings, [("a", case("a")), ("b", case("b"))])
    assert calls == ["a", "b", "b"]  # "a" was not run again
    assert [row["case"] for row in rows] == ["a", "b"]

    rows = benchmark.run_cases(  # other settings: nothing is taken from the saved cases
        str(tmp_path), {"quick": False}, [("a", case("a")), ("b", case("b"))]
    )
    assert calls == ["a", "b", "b", "a", "b"]
    benchmark.run_cases(str(tmp_path), {"quick": False}, [("a", case("a"))], fresh=True)
    assert calls[-1] == "a"


class _Device:
    """A stand-in for an accelerator whose allocator holds ``limit`` bytes (None: the CPU's)."""

    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit}


def test_the_accelerator_shape_is_the_largest_whose_naive_path_fits(monkeypatch):
    benchmark = load_benchmark()
    # each row's program compiled once, for this test's reference and largest_naive_fit alike
    compiled_memory = memoized_compiled_memory()
    monkeypatch.setattr(benchmark, "compiled_memory", compiled_memory)
    d, v, rows = 16, 1000, (64, 128, 256)
    s = jax.ShapeDtypeStruct

    def needed(n):  # the naive path's arguments, outputs and temporaries
        args = (s((n, d), jnp.float32), s((v, d), jnp.float32), s((n,), jnp.int32))
        memory = compiled_memory(jax.value_and_grad(benchmark._naive_linear, (0, 1)), *args)
        return sum(
            (memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes)
        )

    assert all(needed(n) >= n * v * 4 for n in rows)  # at least the [N, V] logits
    fit = lambda limit: benchmark.largest_naive_fit(_Device(limit), d, v, jnp.float32, rows)
    between = (needed(128) + needed(256)) / 2 / 0.9
    assert fit(between) == (128, d, v)
    assert fit(needed(256) / 0.9) == (256, d, v)
    assert fit(10**12) == (256, d, v)
    assert fit(needed(64) / 0.9 - 1) is None
    assert fit(None) is None  # no allocator limit reported: no accelerator shape


class _Torch:
    """A stand-in for PyTorch, with or without CUDA."""

    def __init__(self, cuda):
        self.cuda = type("cuda", (), {"is_available": staticmethod(lambda: cuda)})


@pytest.mark.parametrize(
    "backend, torch, expected",
    [
        ("cpu", None, None),  # no PyTorch: no PyTorch competitor
        ("cpu", _Torch(cuda=False), "cpu"),
        ("gpu", _Torch(cuda=True), "cuda"),
        ("gpu", _Torch(cuda=False), None),  # a CPU PyTorch is not set against a GPU JAX
        ("tpu", _Torch(cuda=True), None),
    ],
)
def test_pytorch_runs_on_the_device_jax_runs_on(monkeypatch, backend, torch, expected):
    benchmark = load_benchmark()
    monkeypatch.setattr(benchmark, "torch", torch)
    monkeypatch.setattr(benchmark.jax, "default_backend", lambda: backend)
    assert benchmark.torch_device() == expected


def test_case_one_adds_only_the_shapes_whose_naive_composition_fits(monkeypatch):
    benchmark = load_benchmark()
    # each shape's program compiled once, for this test's reference and naive_fits alike
    compiled_memory = memoized_compiled_memory()
    monkeypatch.setattr(benchmark, "compiled_memory", compiled_memory)
    s = jax.ShapeDtypeStruct

    def needed(n, c):
        args = (s((n, c), jnp.float32), s((n,), jnp.int32))
        memory = compiled_memory(jax.value_and_grad(benchmark._naive_loss), *args)
        return sum(
            (memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes)
        )

    shapes = [(64, 100), (128, 1000), (256, 1000)]
    assert needed(128, 1000) >= 2 * 128 * 1000 * 4  # the logits and their gradient at least
    limit = (needed(128, 1000) + needed(256, 1000)) / 2 / 0.9
    assert benchmark.naive_fits(_Device(limit), shapes) == shapes[:2]
    assert benchmark.naive_fits(_Device(10**12), shapes) == shapes
    assert benchmark.naive_fits(_Device(None), shapes) == []


def test_the_spiral_runs_must_end_at_the_same_loss():
    benchmark = load_benchmark()
    same = {"numpy": np.float32(0.2445), "jax_scan": 0.2433, "torch": 0.2437, "jaxsoftmax": 0.2437}
    assert benchmark.spiral_runs_agree(same) is True
    # the same training from the same start may differ by rounding, not by 5%
    assert not benchmark.spiral_runs_agree({**same, "jax_scan": 0.2445 * 1.05})
    assert not benchmark.spiral_runs_agree({**same, "torch": 0.2445 * 0.95})
    # the library's trainer (its own draw) within 10% of NumPy's loss, not 20%
    assert benchmark.spiral_runs_agree({**same, "jaxsoftmax": 0.2445 * 1.08})
    assert not benchmark.spiral_runs_agree({**same, "jaxsoftmax": 0.2445 * 1.2})
    assert benchmark.spiral_runs_agree({k: v for k, v in same.items() if k != "torch"})


@pytest.mark.parametrize(
    "repeats, seconds_per_round, competitors, expected",
    [
        (8, 10.0, 4, 8),  # slow: the rounds asked for
        (8, 0.08, 4, 28),  # 2 s / 0.08 s = 25 rounds, up to whole squares of 4
        (8, 0.001, 4, 32),  # at most four times the rounds asked for
        (8, 0.1, 3, 24),  # an odd count's square is 6 rounds: 20 -> 24
        (1, 0.001, 3, 6),  # the quick run: one whole square
    ],
)
def test_fast_calls_get_more_rounds_in_whole_squares(
    repeats, seconds_per_round, competitors, expected
):
    assert load_benchmark().harness.rounds_for(repeats, seconds_per_round, competitors) == expected


def test_the_ratio_spread_pairs_the_competitors_round_by_round():
    benchmark = load_benchmark()
    rng = np.random.default_rng(0)
    drift = rng.uniform(1.0, 3.0, size=9)  # the machine slows both alike in a round
    ratio = rng.uniform(0.8, 1.2, size=9)
    rounds = [{"a": d * r, "b": d} for d, r in zip(drift, ratio)]
    assert np.allclose(benchmark.ratio_quartiles(rounds, "a", "b"), np.percentile(ratio, [25, 75]))
    assert benchmark.medians(rounds) == {"a": np.median(drift * ratio), "b": np.median(drift)}
    assert benchmark.ratio_quartiles(rounds[:1], "a", "b") == [ratio[0], ratio[0]]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_case_one_compares_every_competitors_loss_and_gradient_with_optax(dtype):
    benchmark = load_benchmark()
    rng = np.random.default_rng(1)
    logits = jnp.asarray(2 * rng.normal(size=(64, 50)), dtype)
    labels = rng.integers(0, 50, size=64).astype(np.int32)
    # jitted, as the benchmark runs its competitors: one program, not one per operation
    loss, grad = jax.jit(
        jax.value_and_grad(
            lambda z, y: benchmark.optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
        )
    )(logits, labels)
    # PyTorch's documented result, computed here in float64: mean(lse - z[label]) and
    # (softmax - onehot) / N
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    by_hand = (
        np.mean(lse - z[np.arange(64), labels]),
        (np.exp(z - lse[:, None]) - np.eye(50)[labels]) / 64,
    )
    assert benchmark.case_one_agrees({"optax": (loss, grad), "torch": by_hand}, dtype)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    wrong_grad = (by_hand[0], by_hand[1] + np.eye(50)[labels] * 3 * tol / 64)
    assert not benchmark.case_one_agrees({"optax": (loss, grad), "torch": wrong_grad}, dtype)
    wrong_loss = (by_hand[0] * (1 + 3 * tol), by_hand[1])
    assert not benchmark.case_one_agrees({"optax": (loss, grad), "torch": wrong_loss}, dtype)


def test_case_two_checks_both_methods_against_the_naive_path(monkeypatch):
    benchmark = load_benchmark()
    monkeypatch.setattr(
        benchmark, "time_interleaved", lambda calls, repeats: dict.fromkeys(calls, 1.0)
    )

    def agree():
        (row,) = benchmark.case_linear([(64, 16, 300)], [], [jnp.float32], 1)
        return row["agree"]

    # That the real methods agree is read from the quick run's case 2 row
    # (test_benchmark_quick_run): case_linear compiles all of its programs anew on every call.
    real = benchmark.linear_cross_entropy

    def recompute_off_by_a_percent(h, w, y, **options):
        loss = real(h, w, y, **options)
        return loss * 1.01 if options.get("method") == "recompute" else loss

    monkeypatch.setattr(benchmark, "linear_cross_entropy", recompute_off_by_a_percent)
    assert not agree()


@pytest.mark.parametrize(
    "modes, tunables, expected_mode",
    [
        ("always [madvise] never\n", "glibc.malloc.hugetlb=1", "madvise"),
        ("[always] madvise never\n", None, "always"),
        (None, None, "unknown"),  # no such file: not Linux, or no transparent huge pages
    ],
)
def test_the_results_record_how_fresh_memory_is_paged(
    tmp_path, monkeypatch, modes, tunables, expected_mode
):
    benchmark = load_benchmark()
    modes_file = tmp_path / "enabled"
    if modes is not None:
        modes_file.write_text(modes)
    if tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert benchmark.memory_setting(str(modes_file)) == dict(
        transparent_hugepages=expected_mode, glibc_tunables=tunables or ""
    )


def test_the_reproduce_command_carries_the_glibc_tunables(tmp_path, monkeypatch):
    benchmark = load_benchmark()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    # Only the metadata is under test: no case runs.
    monkeypatch.setattr(benchmark, "run_cases", lambda out, settings, cases, fresh: [])
    monkeypatch.setattr(benchmark, "write_chart", lambda path, rows: None)
    (tmp_path / benchmark.harness.PARTIAL_RESULTS).write_text(
        "{}"
    )  # what run_cases leaves, removed
    benchmark.main(["--quick", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["command"] == (
        "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/benchmark.py --quick --out "
        f"{tmp_path}"
    )
    assert meta["memory"]["glibc_tunables"] == "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES `glibc.malloc.hugetlb=1`" in (tmp_path / "results.md").read_text()

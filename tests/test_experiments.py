"""The experiment scripts, run end to end as a user runs them, on tiny configurations."""

import csv
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import child_process
import jax
import jax.numpy as jnp
import pytest

import jaxsoftmax
from jaxsoftmax import training

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_script(name):
    """An experiment script imported as a module, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(
        f"experiments_{name}", ROOT / "experiments" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The scripts' persistent compilation cache, for the runs of this test process: a folder of
# its own (never the user's), shared by the runs, which then skip compiling what an earlier
# run compiled. The suite turns the cache off (conftest.py); these child processes turn it on.
CACHE_HOME = tempfile.mkdtemp(prefix="jaxsoftmax-tests-cache-")


def script_environment(**extra: str) -> dict[str, str]:
    """A script's environment: child_process.environment's (the CPU platform, so JAX does not
    spend start-up probing for others; the repository on PYTHONPATH) with the scripts' cache
    on, in CACHE_HOME, and ``extra`` variables over those."""
    cache = {"XDG_CACHE_HOME": CACHE_HOME, "JAXSOFTMAX_NO_COMPILATION_CACHE": "0"}
    return child_process.environment(**{**cache, **extra})


def run_script(name, *arguments, expect_success=True, environment=None):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / name), *arguments],
        capture_output=True,
        text=True,
        env=script_environment(**(environment or {})),
        timeout=300,
        check=False,
    )
    if expect_success:
        assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


# The train.py runs that several tests read share one run each (module-scoped fixtures); their
# tests run on one test worker (--dist loadgroup), so each such run happens once in the suite.
SHARED_RUNS = pytest.mark.xdist_group("experiments_train_runs")
# Likewise the tests that read the one child Python of the usage fixture.
USAGE = pytest.mark.xdist_group("experiments_usage")

FIRST_RUN = ["--num-examples", "30", "--hidden", "16,8", "--eval-every", "20"]
FIRST_RUN += ["--checkpoint-every", "20"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """``(completed process, folder)``: train.py with its plots into ``folder/run``, its
    persistent compilation cache on in ``folder/cache``, a folder of its own."""
    folder = tmp_path_factory.mktemp("first-run")
    completed = run_script(
        "train.py",
        *FIRST_RUN,
        *("--steps", "40"),
        "--out",
        str(folder / "run"),
        environment={"XDG_CACHE_HOME": str(folder / "cache")},
    )
    return completed, folder


@pytest.fixture(scope="module")
def resumed_run(first_run, tmp_path_factory):
    """The first run's outputs (a copy) resumed by a second process to 60 steps, while readers
    hold the first run's files open, with temporaries of a killed run left in the folder. It
    runs with JAXSOFTMAX_NO_COMPILATION_CACHE=1 and a cache folder of its own, which must stay
    empty (test_the_compilation_cache_can_be_turned_off)."""
    folder = tmp_path_factory.mktemp("resumed-run")
    out = folder / "run"
    shutil.copytree(first_run[1] / "run", out)
    readers = {name: open(out / name, newline="") for name in ("metrics.json", "history.csv")}
    first_contents = {name: (out / name).read_bytes().decode() for name in readers}
    for name in (".metrics-dead.tmp", ".history-dead.tmp", ".checkpoint-dead.tmp"):
        (out / name).write_text("partial")
    completed = run_script(
        "train.py",
        *FIRST_RUN,
        *("--steps", "60"),
        "--out",
        str(out),
        "--resume",
        "--no-plots",
        "--no-progress",
        environment={
            "XDG_CACHE_HOME": str(folder / "cache"),
            "JAXSOFTMAX_NO_COMPILATION_CACHE": "1",
        },
    )
    seen = {}
    for name, reader in readers.items():
        with reader:
            seen[name] = reader.read()
    return dict(completed=completed, out=out, folder=folder, first=first_contents, seen=seen)


# Command lines that end in argparse (help, usage errors) before any work: one child Python runs
# them all in turn, each script run as `python script.py flags` runs it (as __main__, with that
# sys.argv, its folder first on sys.path, a fresh copy of os.environ), its exit status, stdout
# and stderr recorded apart. A process each spent 3 s apiece importing JAX for the same answer.
_USAGE_RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback

calls, results_file, results = json.loads(sys.argv[1]), sys.argv[2], []
for script, flags in calls:
    environ, path = dict(os.environ), list(sys.path)
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = [script, *flags]
    sys.path.insert(0, os.path.dirname(script))
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            code = code or 0
        except BaseException:
            traceback.print_exc()
            code = 1
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = path
    results.append([code, stdout.getvalue(), stderr.getvalue()])
with open(results_file, "w") as file:
    json.dump(results, file)
"""


def run_usage_lines(command_lines, results_file):
    """``[CompletedProcess]`` for ``command_lines`` of ``(script, *flags)``, all run by one
    child Python (``_USAGE_RUNNER``, which writes them to ``results_file``) in the environment
    run_script gives."""
    calls = [(str(ROOT / "experiments" / script), list(flags)) for script, *flags in command_lines]
    completed = subprocess.run(
        [sys.executable, "-c", _USAGE_RUNNER, json.dumps(calls), str(results_file)],
        capture_output=True,
        text=True,
        env=script_environment(),
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json.loads(pathlib.Path(results_file).read_text())
    return [
        subprocess.CompletedProcess(line, code, stdout, stderr)
        for line, (code, stdout, stderr) in zip(command_lines, results, strict=True)
    ]


@SHARED_RUNS
def test_train_writes_its_outputs_and_resumes(first_run, resumed_run):
    completed, folder = first_run
    out = folder / "run"
    assert "device: cpu" in completed.stdout or "device:" in completed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "train_accuracy",
        "test_accuracy",
        "final_loss",
        "steps",
        "train_seconds",
        "device",
        "versions",
        "config",
    ):
        assert key in metrics
    assert metrics["steps"] == 40 and metrics["config"]["hidden"] == [16, 8]
    assert 0.0 <= metrics["train_accuracy"] <= 1.0 and metrics["train_seconds"] > 0
    with open(out / "history.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [0, 20, 40]
    for picture in ("loss.png", "decision_boundary.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a reader of the first run's files keeps reading them whole while the second run writes
    # (the new files are renamed into place); temporaries of a killed run are cleared
    assert resumed_run["seen"] == resumed_run["first"]
    resumed = resumed_run["out"]
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["steps"] == 60 and "resumed from step 40" in metrics["train_seconds_note"]
    assert not list(resumed.glob(".*.tmp"))


def test_metrics_versions_name_the_package_version_when_not_installed(monkeypatch):
    train = load_script("train")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    versions = train.common.library_versions()
    assert versions["jaxsoftmax"] == jaxsoftmax.__version__
    assert versions["jax"] == "not installed"
    # a source tree that is not installed reports its pyproject version, marked as such
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE).group(1)
    assert jaxsoftmax._version() == f"{version}+source"


@pytest.fixture(scope="module")
def iris_run(tmp_path_factory):
    """train.py's linear classifier on iris into ``folder/run``, with --no-compilation-cache
    and a cache folder of its own, ``folder/cache``, which must stay empty
    (test_the_compilation_cache_can_be_turned_off)."""
    folder = tmp_path_factory.mktemp("iris-run")
    run_script(
        "train.py",
        *("--dataset", "iris", "--standardize", "--hidden", "0", "--steps", "50"),
        *("--eval-every", "50", "--checkpoint-every", "50", "--no-progress"),
        "--no-compilation-cache",
        *("--out", str(folder / "run")),
        environment={"XDG_CACHE_HOME": str(folder / "cache")},
    )
    return folder


@SHARED_RUNS
def test_train_linear_classifier_on_four_features_draws_no_boundary(iris_run):
    out = iris_run / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["hidden"] == [] and metrics["dataset"]["features"] == 4
    assert (out / "loss.png").exists() and not (out / "decision_boundary.png").exists()


@USAGE
def test_train_rejects_bad_flags_naming_the_choices(usage):
    unknown = usage("train.py", "--dataset", "mnist")
    assert unknown.returncode == 2
    assert "invalid choice: 'mnist'" in unknown.stderr
    assert "spiral" in unknown.stderr and "digits" in unknown.stderr
    negative = usage("train.py", "--hidden", "10,-3")
    assert negative.returncode == 2 and "--hidden '10,-3'" in negative.stderr


BAD_FLAGS = [
    (["--steps", "0"], ["argument --steps:", "positive integer", "'0'"]),
    (["--batch-size", "0"], ["argument --batch-size:", "positive integer", "'0'"]),
    (["--eval-every", "-5"], ["argument --eval-every:", "positive integer", "'-5'"]),
    (
        ["--eval-every", "30", "--checkpoint-every", "100"],
        ["argument --checkpoint-every:", "checkpoint_every=100", "multiple of eval_every=30"],
    ),
    (
        ["--class-weights", "1,2"],
        ["argument --class-weights:", "(1.0, 2.0) holds 2 weight(s)", "has 3 classes"],
    ),
    (["--class-weights", "1,a"], ["argument --class-weights:", "numbers", "'1,a'"]),
    (
        ["--dataset", "iris", "--num-examples", "10"],
        ["argument --num-examples:", "num_examples=10", "'iris'", "leave it unset"],
    ),
    (
        ["--dataset", "moons", "--num-examples", "1"],
        ["argument --num-examples:", "num_examples=1", "at least 2"],
    ),
    (["--label-smoothing", "2"], ["argument --label-smoothing:", "<= 1.0; got 2.0"]),
    (["--logit-softcap", "0"], ["argument --logit-softcap:", "> 0.0; got 0.0"]),
]


def train_usage_error(flags, tmp_path, capsys, monkeypatch) -> str:
    """train.py's stderr for ``flags``, which must end it with exit status 2 before training."""
    train = load_script("train")

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started despite a bad flag")

    monkeypatch.setattr(training, "train", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*flags, "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, expected", BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS]
)
def test_train_reports_bad_flags_as_usage_errors_before_computing(
    flags, expected, tmp_path, capsys, monkeypatch
):
    stderr = train_usage_error(flags, tmp_path, capsys, monkeypatch)
    assert "Traceback" not in stderr and "error: argument" in stderr
    for part in expected:
        assert part in stderr
    assert not (tmp_path / "out").exists()


def test_the_default_checkpoint_interval_follows_eval_every():
    train = load_script("train")
    for eval_every, checkpoint_every in (("100", 1000), ("30", 1020), ("2500", 2500)):
        arguments = train.parse_arguments(["--eval-every", eval_every])
        config = train.config_from_arguments(arguments)
        assert (config.eval_every, config.checkpoint_every) == (int(eval_every), checkpoint_every)


ONE_CHILD_RUNS = pytest.mark.xdist_group("experiments_one_child_runs")


@pytest.fixture(scope="module")
def one_child_runs(tmp_path_factory):
    """``(folder, {name: CompletedProcess})``: per_example_grads.py on iris, then train.py
    diverging (into ``folder/diverged``), each a fresh run of its script by one child Python
    (run_usage_lines; neither changes JAX's configuration); a child each spent 3 s more
    starting Python and JAX."""
    folder = tmp_path_factory.mktemp("one-child-runs")
    per_example = ("per_example_grads.py", "--dataset", "iris", "--batch-size", "8")
    per_example += ("--hidden", "8", "--repeats", "1")
    diverging = ("train.py", "--num-examples", "20", "--hidden", "8", "--l2", "3")
    diverging += ("--steps", "400", "--eval-every", "10", "--checkpoint-every", "20")
    diverging += ("--out", str(folder / "diverged"), "--no-progress")
    per_example_run, diverged = run_usage_lines([per_example, diverging], folder / "results.json")
    return folder, dict(per_example=per_example_run, diverged=diverged)


@ONE_CHILD_RUNS
def test_train_stops_on_a_non_finite_loss(one_child_runs):
    folder, runs = one_child_runs
    stopped = runs["diverged"]
    assert stopped.returncode == 2, stopped
    assert "non-finite" in stopped.stderr and "last good checkpoint" in stopped.stderr
    assert (folder / "diverged" / "checkpoint.npz").exists()


GRADIENT_CHECK = pytest.mark.xdist_group("experiments_gradient_check")


@pytest.fixture(scope="module")
def gradient_checks(tmp_path_factory):
    """gradient_check.py's passing run, its table written over a file a reader holds open, and
    a failing run, both by one child Python (run_usage_lines), each a fresh run of the script
    (both turn on float64 as they start); a child each spent 3 s more starting Python and JAX."""
    folder = tmp_path_factory.mktemp("gradient-check")
    table = folder / "table.json"
    table.write_text("old table")
    with open(table) as reader:  # the new table is renamed into place
        # a finite-difference step of 1e-1 has a truncation error far above the 1e-8 tolerance
        lines = [("gradient_check.py", "--json", str(table))]
        lines += [("gradient_check.py", "--eps", "1e-1", "--network", "000")]
        passed, failed = run_usage_lines(lines, folder / "results.json")
        read = reader.read()
    return dict(passed=passed, failed=failed, table=table, read=read)


@GRADIENT_CHECK
def test_gradient_check_passes_and_reports_every_parameter(gradient_checks):
    completed = gradient_checks["passed"]
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert gradient_checks["read"] == "old table"
    assert "all 20 comparisons within tolerance" in completed.stdout
    rows = json.loads(gradient_checks["table"].read_text())["rows"]
    assert {(row["network"][:8], row["parameter"]) for row in rows} == {
        (seed, p) for seed in ("seed 000", "seed 002") for p in ("W1", "b1", "W2", "b2")
    }
    assert all(row["ok"] for row in rows)


@GRADIENT_CHECK
def test_gradient_check_fails_when_a_tolerance_is_exceeded(gradient_checks):
    completed = gradient_checks["failed"]
    assert completed.returncode == 1 and "exceed their tolerance" in completed.stderr, completed


@ONE_CHILD_RUNS
def test_per_example_grads_agree_with_the_loop(one_child_runs):
    completed = one_child_runs[1]["per_example"]
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "max |vmap - loop|" in completed.stdout and "speed-up" in completed.stdout


def test_profile_fusions_reports_each_compiled_kernel_of_both_losses():
    profile_fusions = load_script("profile_fusions")
    report = profile_fusions.main(["--shape", "64", "50", "--calls", "3"])
    assert set(report) == {"jaxsoftmax", "optax"}
    for loss, rows in report.items():
        fn = jax.jit(jax.value_and_grad(profile_fusions.LOSSES[loss]))
        # shapes only: the program is lowered and compiled, never run
        logits, labels = (
            jax.ShapeDtypeStruct((64, 50), jnp.float32),
            jax.ShapeDtypeStruct((64,), jnp.int32),
        )
        compiled = profile_fusions.entry_instructions(fn.lower(logits, labels).compile().as_text())
        assert rows and {row["name"] for row in rows} <= set(compiled)
        assert all(row["seconds"] > 0 for row in rows)
        # the gradient is written by some kernel with the logits' shape
        assert any(row["shape"].startswith("f32[64,50]") for row in rows)
        assert [row["seconds"] for row in rows] == sorted(
            (r["seconds"] for r in rows), reverse=True
        )


TINY_RUN = [
    "--num-examples",
    "10",
    "--hidden",
    "4",
    "--eval-every",
    "1",
    "--checkpoint-every",
    "1",
    "--no-plots",
    "--no-progress",
]


def one_error_line(stderr):
    """The stderr of a usage error: exactly one line, ``...: error: ...``, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and ": error: " in lines[0]
    return lines[0]


BAD_NUMBERS = [
    (["--lr", "-1"], ["argument --lr:", "'-1'", "> 0"]),
    (["--lr", "0"], ["argument --lr:", "'0'", "> 0"]),
    (["--lr", "nan"], ["argument --lr:", "'nan'", "> 0"]),
    (["--momentum", "1"], ["argument --momentum:", "'1'", "[0, 1)"]),
    (["--momentum", "-0.5"], ["argument --momentum:", "'-0.5'", "[0, 1)"]),
    (["--l2", "-0.001"], ["argument --l2:", "'-0.001'", ">= 0"]),
    (["--z-loss", "-1"], ["argument --z-loss:", "'-1'", ">= 0"]),
    (["--init-scale", "0"], ["argument --init-scale:", "'0'", "> 0"]),
]


@pytest.mark.parametrize(
    "flags, expected", BAD_NUMBERS, ids=[" ".join(flags) for flags, _ in BAD_NUMBERS]
)
def test_train_rejects_bad_numbers_in_one_line_before_any_work(
    flags, expected, tmp_path, capsys, monkeypatch
):
    line = one_error_line(train_usage_error(flags, tmp_path, capsys, monkeypatch))
    for part in expected:
        assert part in line
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_batch_larger_than_the_training_set(tmp_path, capsys, monkeypatch):
    # The library trains it full batch, and metrics.json would record a batch that never ran.
    flags = ["--dataset", "iris", "--batch-size", "1000"]
    line = one_error_line(train_usage_error(flags, tmp_path, capsys, monkeypatch))
    assert re.search(r"--batch-size 1000 is more than the \d+ training examples of 'iris'", line)
    assert "leave --batch-size out to train full batch" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["the file", "under the file"])
def test_train_rejects_an_output_path_that_is_a_file(where, tmp_path, capsys, monkeypatch):
    train = load_script("train")
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started"))
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    out = existing if where == "the file" else existing / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "argument --out:" in line and str(out) in line and "directory" in line
    assert existing.read_text() == "keep me"


def test_train_bad_flag_in_a_real_process_is_one_line_without_traceback(tmp_path):
    completed = run_script(
        "train.py", "--lr", "-1", "--out", str(tmp_path / "out"), expect_success=False
    )
    assert completed.returncode == 2 and completed.stdout == ""
    assert "argument --lr:" in one_error_line(completed.stderr)
    assert not (tmp_path / "out").exists()


def test_train_resume_says_where_it_starts_and_refuses_other_flags_before_work(
    tmp_path, capsys, monkeypatch
):
    train = load_script("train")
    out = str(tmp_path / "run")
    assert train.main([*TINY_RUN, "--steps", "2", "--out", out, "--resume"]) == 0
    stdout = capsys.readouterr().out
    assert "no checkpoint" in stdout and "starting from scratch" in stdout
    wrote = next(line for line in stdout.splitlines() if line.startswith("wrote "))
    assert "checkpoint.npz" in wrote and "metrics.json" in wrote and "history.csv" in wrote
    assert (tmp_path / "run" / "checkpoint.npz").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["optimizer"] == "sgd" and "momentum" not in metrics["config"]

    assert train.main([*TINY_RUN, "--steps", "5", "--out", out, "--resume"]) == 0
    stdout = capsys.readouterr().out
    assert "resuming from step 2" in stdout
    summary = next(line for line in stdout.splitlines() if line.startswith("train accuracy"))
    assert "3 steps this run, resumed from step 2" in summary

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started"))
    for flags, expected in (
        (["--steps", "6", "--lr", "0.5"], "different configuration"),
        (["--steps", "3"], "beyond steps=3"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            train.main([*TINY_RUN, *flags, "--out", out, "--resume"])
        assert exit_info.value.code == 2
        line = one_error_line(capsys.readouterr().err)
        assert "argument --resume:" in line and expected in line


def test_metrics_record_momentum_only_when_the_optimizer_uses_it():
    train = load_script("train")
    for optimizer, recorded in (("sgd", False), ("adam", False), ("momentum", True)):
        config = train.config_from_arguments(
            train.parse_arguments(["--optimizer", optimizer, "--momentum", "0.5"])
        )
        used = train.config_used(config)
        assert ("momentum" in used) == recorded and used["optimizer"] == optimizer
        if recorded:
            assert used["momentum"] == 0.5


SCRIPTS = [
    "train.py",
    "gradient_check.py",
    "per_example_grads.py",
    "data_parallel.py",
    "profile_fusions.py",
    "benchmark_sharded.py",
]


# The scripts that compile, which offer the switch of their persistent compilation cache.
COMPILING_SCRIPTS = ["train.py", "gradient_check.py", "per_example_grads.py", "data_parallel.py"]


OTHER_BAD_NUMBERS = [
    ("gradient_check.py", ["--eps", "0"], "argument --eps:"),
    ("gradient_check.py", ["--json", "/no/such/folder/t.json"], "argument --json:"),
    ("per_example_grads.py", ["--repeats", "0"], "argument --repeats:"),
    ("data_parallel.py", ["--steps", "10,-1"], "argument --steps:"),
    ("profile_fusions.py", ["--shape", "0", "10"], "argument --shape:"),
    ("benchmark_sharded.py", ["--rows", "-1"], "argument --rows:"),
]


@pytest.fixture(scope="module")
def usage(tmp_path_factory):
    """``usage(script, *flags)``: the CompletedProcess of ``python script flags`` for the
    command lines of the tests marked USAGE, all run by one child Python (run_usage_lines);
    train.py's get ``--out`` a fresh folder, so a flag wrongly accepted trains nowhere else."""
    folder = tmp_path_factory.mktemp("usage")
    lines = [(script, "--help") for script in [*SCRIPTS, "benchmark.py"]]
    lines += [(script, *flags) for script, flags, _ in OTHER_BAD_NUMBERS]
    lines += [("benchmark.py", "--repeats", "0")]
    lines += [("train.py", "--dataset", "mnist"), ("train.py", "--hidden", "10,-3")]
    out = ("--out", str(folder / "out"))
    ran = [
        (*line, *out) if line[0] == "train.py" and line[1] != "--help" else line for line in lines
    ]
    results = dict(zip(lines, run_usage_lines(ran, folder / "results.json"), strict=True))
    return lambda *line: results[line]


@USAGE
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_of_every_script_shows_its_default_in_help(script, usage):
    completed = usage(script, "--help")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    usage_text, _, _ = completed.stdout.partition("\n\n")
    flags = set(re.findall(r"\[(--[\w-]+)", usage_text)) - {"--help"}
    assert flags and completed.stdout.count("(default:") == len(flags), completed.stdout
    # every flag has a description, not just the default: no option line ends at its default
    assert not re.search(r"^\s+--[\w-]+(?: [A-Z_ ]+)?\s+\(default:", completed.stdout, re.M)
    # Read from the same help text (a second test ran each of these scripts' --help again).
    if script in COMPILING_SCRIPTS:
        assert "--no-compilation-cache" in completed.stdout, completed.stdout


@USAGE
@pytest.mark.parametrize("script, flags, named", OTHER_BAD_NUMBERS)
def test_other_scripts_reject_bad_numbers_as_usage_errors(script, flags, named, usage):
    completed = usage(script, *flags)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr and named in completed.stderr


def test_decision_boundary_regions_and_points_take_one_colour_per_class(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from jaxsoftmax import data, mlp

    train = load_script("train")
    colours = train.class_colours(3)
    assert colours.shape == (3, 4) and len({tuple(row) for row in colours}) == 3
    assert train.class_colours(1).shape == (1, 4)

    seen = {}
    original_contourf, original_scatter = Axes.contourf, Axes.scatter

    def contourf(self, *args, **kwargs):
        seen["regions"] = (kwargs.get("colors"), kwargs.get("cmap"), kwargs.get("levels"))
        return original_contourf(self, *args, **kwargs)

    def scatter(self, x, y, **kwargs):
        seen["points"] = (kwargs.get("c"), kwargs.get("cmap"))
        return original_scatter(self, x, y, **kwargs)

    monkeypatch.setattr(Axes, "contourf", contourf)
    monkeypatch.setattr(Axes, "scatter", scatter)
    monkeypatch.setattr(train.common, "save_figure", lambda figure, path: None)  # nothing rendered
    dataset = data.load("spiral", num_examples=10)
    params = mlp.init(jax.random.key(0), [2, 4, 3])
    train.plot_decision_boundary(str(tmp_path / "b.png"), params, dataset, "relu", "t")
    region_colours, region_map, levels = seen["regions"]
    point_colours, point_map = seen["points"]
    assert region_map is None and point_map is None  # no colour map to normalise differently
    assert list(levels) == [-0.5, 0.5, 1.5, 2.5]  # region k lies between levels k -+ 0.5
    assert [tuple(c) for c in region_colours] == [tuple(c) for c in colours]
    for label, colour in zip(dataset.y_train, point_colours):
        assert tuple(colour) == tuple(colours[label])


def test_train_stopped_before_its_first_checkpoint_leaves_no_empty_folder(tmp_path, capsys):
    train = load_script("train")
    out = tmp_path / "run"
    flags = ["--num-examples", "10", "--hidden", "4", "--lr", "1e30", "--steps", "20"]
    flags += ["--eval-every", "10", "--checkpoint-every", "20", "--no-plots", "--no-progress"]
    assert train.main([*flags, "--out", str(out)]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04garbage"])
def test_train_resume_from_an_unreadable_checkpoint_is_a_usage_error(
    content, tmp_path, capsys, monkeypatch
):
    train = load_script("train")
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "checkpoint.npz").write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY_RUN, "--steps", "2", "--out", str(tmp_path), "--resume"])
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "argument --resume:" in line and "cannot be read" in line


def cache_entries(cache_home):
    folder = pathlib.Path(cache_home) / "jaxsoftmax" / "jax-compilation-cache"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@SHARED_RUNS
def test_a_second_run_loads_its_programs_from_the_compilation_cache(first_run):
    """The first run of train.py fills the cache in $XDG_CACHE_HOME; a second run, into
    another --out, compiles nothing new: every program comes from the cache."""
    _, folder = first_run
    first = cache_entries(folder / "cache")
    assert first, "the first run wrote no compiled program"
    run_script(
        "train.py",
        *FIRST_RUN,
        *("--steps", "40"),
        *("--out", str(folder / "two")),
        environment={"XDG_CACHE_HOME": str(folder / "cache")},
    )
    assert cache_entries(folder / "cache") == first


@SHARED_RUNS
@pytest.mark.parametrize("how", ["flag", "variable"])
def test_the_compilation_cache_can_be_turned_off(how, request):
    """With the flag (the iris run) or the variable (the resumed run), a run that compiles
    writes nothing into the cache folder it was given."""
    if how == "flag":
        folder = request.getfixturevalue("iris_run")
    else:
        folder = request.getfixturevalue("resumed_run")["folder"]
    assert cache_entries(folder / "cache") == [], how


def test_the_suite_never_turns_on_the_users_compilation_cache(tmp_path, monkeypatch):
    """conftest.py turns the scripts' cache off for the whole suite: a script's main() run in
    the test process (as several tests do) neither points JAX's cache at the user's folder nor
    writes under $XDG_CACHE_HOME, and the processes the suite starts inherit the switch."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train = load_script("train")
    small = ["--num-examples", "30", "--hidden", "8", "--steps", "20", "--no-progress"]
    assert train.main([*small, "--no-plots", "--out", str(tmp_path / "run")]) == 0
    folder = os.path.join("jaxsoftmax", "jax-compilation-cache")
    assert folder not in str(jax.config.jax_compilation_cache_dir)
    assert cache_entries(tmp_path / "cache") == [] and not (tmp_path / "cache").exists()
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['JAXSOFTMAX_NO_COMPILATION_CACHE'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "1"


@USAGE
def test_benchmark_flags_show_defaults_and_refuse_bad_repeats(usage):
    shown = usage("benchmark.py", "--help")
    help_text = shown.stdout
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert help_text.count("(default:") >= 5, help_text
    refused = usage("benchmark.py", "--repeats", "0")
    assert refused.returncode == 2
    assert "--repeats" in refused.stderr and "Traceback" not in refused.stderr

"""Training and the sharded losses on JAX's multi-process runtime, and the local launcher.

The runs start 2 processes x 4 virtual CPU devices through ``experiments/launch.py``: one JAX
program over 8 devices in two processes that find each other on 127.0.0.1 and communicate
through CPU collectives (gloo), as hosts of a cluster do. They are compared with 1 device (this
process); 1 process x 8 devices against 1 device is tests/multidevice/check_data_parallel.py's,
for the same two training cases. Every child runs under a time
limit, and the launcher kills what is left of a run when a process fails.

The runs share a compilation cache of their own (a temporary folder), so a program that one
run compiled, the next loads (under jaxlib 0.12.1 and later, experiments/processes.py turns the
cache off in runs of several processes on the CPU, where a loaded program hangs them). The
first run ends with the killed run of ``experiments/train.py`` (in its own processes, which
reuse their training programs) and the last run resumes it: both must reproduce the parameters
of the first run's uninterrupted training exactly.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shlex
import subprocess
import sys
import time

import child_process
import jax
import numpy as np
import pytest

from jaxsoftmax import data, training

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKS = "tests/multiprocess/check_processes.py"
# tests/multiprocess/check_processes.py's "minibatch" case, as experiments/train.py's flags.
TRAIN_FLAGS = [
    "--num-examples",
    "30",
    "--hidden",
    "16",
    "--optimizer",
    "momentum",
    "--lr",
    "0.1",
    "--batch-size",
    "20",
    "--steps",
    "40",
    "--eval-every",
    "10",
    "--checkpoint-every",
    "20",
    "--no-plots",
    "--no-progress",
]
# As for 8 devices against one (tests/multidevice/check_data_parallel.py).
RTOL, ATOL = 1e-5, 2e-6
BOUND = 60  # seconds within which every process of a failed run must have ended


def load_script(path):
    """A script imported as a module, to use its functions and constants in this process."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def environment(cache: pathlib.Path, devices: int | None = None) -> dict[str, str]:
    # JAXSOFTMAX_NO_COMPILATION_CACHE (tests/conftest.py) keeps the user's cache out; the
    # test's own cache, below, is the one the processes share.
    return child_process.environment(
        devices,
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def launch(arguments, cache, *, timeout=240):
    """``experiments/launch.py ARGUMENTS`` under a time limit: (completed process, seconds)."""
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "experiments/launch.py", *arguments],
        cwd=ROOT,
        env=environment(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return completed, time.monotonic() - started


def report(completed) -> str:
    return f"status {completed.returncode}\n{completed.stdout[-8000:]}\n{completed.stderr[-8000:]}"


def parameters(path) -> list[np.ndarray]:
    with np.load(path) as stored:
        count = len([key for key in stored if key.startswith("leaf_")])
        return [stored[f"leaf_{i}"] for i in range(count)]


def assert_close(got, expected, what, *, exact=False):
    assert len(got) == len(expected), what
    for i, (a, b) in enumerate(zip(got, expected)):
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=f"{what}, leaf {i}")
        else:
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{what}, leaf {i}")


@pytest.mark.longest
def test_two_processes_train_and_compute_the_losses_as_one_process_and_one_device(tmp_path):
    cache, two = tmp_path / "cache", tmp_path / "two"
    two.mkdir()
    checks = load_script(CHECKS)
    train = load_script("experiments/train.py")
    assert train.config_from_arguments(train.parse_arguments(TRAIN_FLAGS)) == (
        training.TrainConfig(**checks.TRAINING["minibatch"])
    )
    # 2 processes x 4 devices: the sharded losses against one device (inside), then training,
    # then (in the same processes: two fewer to start and join) the same minibatch run as
    # experiments/train.py, whose process 1 is killed after step 30 (the checkpoint of step 20
    # is on disk); the run then waits for it in an all-reduce. With --grace 60, the launcher
    # leaves process 0 to stop on its own: JAX's heartbeat, at --peer-timeout 5, must end it.
    out = tmp_path / "train"
    killed_flags = ["--kill-process", "1", "--kill-after-step", "30", *TRAIN_FLAGS]
    killed, seconds = launch(
        [
            "--grace",
            "60",
            "--",
            CHECKS,
            "--out",
            str(two),
            "--peer-timeout",
            "5",
            f"--then-train-until-killed={shlex.join([*killed_flags, '--out', str(out)])}",
        ],
        cache,
    )
    for process in (0, 1):
        assert f"[{process}] process {process}: 4 loss checks passed" in killed.stdout, report(
            killed
        )
        trained = f"[{process}] process {process}: trained full_batch, minibatch"
        assert trained in killed.stdout, report(killed)
        if sys.platform == "linux":  # every socket it listens on is on the loopback
            assert f"[{process}] process {process}: listening on 127.0.0.1:" in killed.stdout
    assert killed.returncode == 128 + 9, report(killed)
    failure = re.search(r"process 1 was killed by SIGKILL after ([\d.]+) s", killed.stderr)
    assert failure, report(killed)
    ended = re.search(r"every process had ended ([\d.]+) s later", killed.stderr)
    assert ended and float(ended.group(1)) < BOUND, report(killed)
    assert "killing process" not in killed.stderr, report(killed)  # it stopped by itself
    assert "[0] " in killed.stderr and "another task died" in killed.stderr, report(killed)
    with np.load(out / training.CHECKPOINT_FILENAME) as stored:
        assert int(stored["step"]) == 20
    print(f"killed run: {seconds:.1f} s; process 0 ended {ended.group(1)} s after process 1")
    # 1 device: this process.
    spiral = data.load("spiral", num_examples=checks.NUM_EXAMPLES)
    for case, options in checks.TRAINING.items():
        one = training.train(training.TrainConfig(**options), spiral)
        assert one.devices == 1 and one.processes == 1
        one_params = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(one.params)]
        two_params = parameters(two / f"{case}.npz")
        assert_close(two_params, one_params, f"{case}: 2 processes x 4 devices against 1 device")
        with np.load(two / f"{case}.npz") as stored:
            history = json.loads(str(stored["history"]))
        assert [row["step"] for row in history] == [row["step"] for row in one.history]
        for key in ("batch_loss", "train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            np.testing.assert_allclose(
                [row[key] or 0.0 for row in history],
                [row[key] or 0.0 for row in one.history],
                rtol=RTOL,
                atol=ATOL,
                err_msg=f"{case}: {key}, 2 processes against 1 device",
            )

    resumed, _ = launch(
        ["--", "experiments/train.py", *TRAIN_FLAGS, "--out", str(out), "--resume"], cache
    )
    assert resumed.returncode == 0, report(resumed)
    assert "[0] resuming from step 20 of" in resumed.stdout, report(resumed)
    assert "launch.py: all 2 processes finished (status 0)" in resumed.stderr, report(resumed)
    assert "[Gloo]" not in resumed.stderr, report(resumed)  # the connection lines: --verbose
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["devices"] == 8 and metrics["processes"] == 2 and metrics["steps"] == 40
    uninterrupted = parameters(two / "minibatch.npz")
    assert_close(
        parameters(out / training.CHECKPOINT_FILENAME)[: len(uninterrupted)],  # then momenta
        uninterrupted,
        "train.py killed at step 30 and resumed from step 20, against an uninterrupted run",
        exact=True,
    )


def test_the_launcher_kills_the_others_when_one_process_fails(tmp_path):
    # tests/multiprocess/fail_fast.py: process 1 exits with status 3 at once; process 0 waits,
    # deaf to SIGTERM, as a JAX process waiting for a dead peer would.
    completed, seconds = launch(
        ["--grace", "0.5", "--", "tests/multiprocess/fail_fast.py", "fail"], tmp_path, timeout=60
    )
    assert completed.returncode == 3, report(completed)
    for process in (0, 1):
        flags = f"--num-processes 2 --process-id {process}"
        assert re.search(
            rf"^\[{process}\] flags: --coordinator 127\.0\.0\.1:\d+ {flags}$",
            completed.stdout,
            re.M,
        ), report(completed)
    assert "[1] failing on purpose" in completed.stderr
    assert "launch.py: process 1 exited with status 3 after" in completed.stderr
    assert "launch.py: killing process(es) 0, still running" in completed.stderr
    assert "launch.py: failed: process 1 exited with status 3" in completed.stderr
    assert seconds < 20, report(completed)


def test_the_launcher_stops_every_process_at_its_timeout(tmp_path):
    completed, seconds = launch(
        ["--timeout", "1", "--", "tests/multiprocess/fail_fast.py", "wait"], tmp_path, timeout=60
    )
    assert completed.returncode == 124, report(completed)
    assert "launch.py: --timeout 1 s reached; killing process(es) 0, 1" in completed.stderr
    assert seconds < 20, report(completed)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            [],
            "error: expected -- and then the script and its flags, such as -- experiments/train.py",
        ),
        (
            ["--processes", "0", "--", "experiments/train.py"],
            "error: argument --processes: expected a positive integer; got '0'",
        ),
        (
            ["--devices-per-process", "x", "--", "experiments/train.py"],
            "error: argument --devices-per-process: expected a positive integer; got 'x'",
        ),
        (
            ["--port", "70000", "--", "experiments/train.py"],
            "error: argument --port: expected a port in [0, 65535]; got '70000'",
        ),
        (
            ["--grace", "-1", "--", "experiments/train.py"],
            "error: argument --grace: expected a number >= 0; got '-1'",
        ),
        (["--"], "error: expected a script after --, such as -- experiments/train.py; got none"),
        (
            ["--", "no/such/script.py"],
            "error: argument SCRIPT: 'no/such/script.py' is not a file; expected a script to run",
        ),
    ],
)
def test_the_launcher_names_a_bad_flag_in_one_line(argv, expected, capsys):
    launcher = load_script("experiments/launch.py")
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and expected in stderr, stderr


def test_the_launcher_help_shows_every_default(capsys):
    launcher = load_script("experiments/launch.py")
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    flags = set(re.findall(r"\[(--[\w-]+)", help_text.partition("\n\n")[0])) - {"--help"}
    valued = {"--processes", "--devices-per-process", "--port", "--grace", "--timeout"}
    assert flags == valued | {"--verbose"}
    assert help_text.count("(default:") == len(flags), help_text
    assert "-- SCRIPT.py [SCRIPT FLAGS]" in help_text


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--process-id", "1"],
            "argument --process-id: also needs --coordinator and --num-processes; expected all of --coordinator, --num-processes and --process-id, or --distributed",
        ),
        (
            ["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
            "argument --coordinator: expected HOST:PORT, such as 127.0.0.1:1234 or node001:1234; got '127.0.0.1'",
        ),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            "argument --process-id: expected 0 to 1 (below --num-processes 2); got 2",
        ),
        (["--peer-timeout", "0"], "argument --peer-timeout: expected a positive integer; got '0'"),
    ],
)
def test_train_names_a_bad_process_flag_before_joining(flags, expected, tmp_path, capsys):
    train = load_script("experiments/train.py")  # in this process: each error comes before JAX
    with pytest.raises(SystemExit) as exit_info:
        train.main([*flags, "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and expected in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_train_names_distributed_outside_a_cluster(tmp_path):
    # A fresh process: JAX joins processes only before its backend starts. No cluster's
    # variables, even if the tests run inside one.
    env = {
        name: value
        for name, value in environment(tmp_path).items()
        if not name.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_COORDINATOR", "KUBERNETES_"))
    }
    completed = subprocess.run(
        [sys.executable, "experiments/train.py", "--distributed", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2, report(completed)
    assert (
        "train.py: error: argument --distributed: JAX found no cluster to read --coordinator, "
        "--num-processes, --process-id from"
    ) in completed.stderr, report(completed)
    assert "Traceback" not in completed.stderr and not (tmp_path / "out").exists()

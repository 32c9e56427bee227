"""Data-parallel training: the script end to end.

The checks on 8 virtual CPU devices (``tests/multidevice/check_data_parallel.py``: every
device count against one device, the compiled step's all-reduce, resume) run in the child
pytest of ``tests/test_eight_devices.py``.
"""

import json
import pathlib
import subprocess
import sys

import child_process
import jax
import numpy as np
import pytest

from jaxsoftmax import data, training

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_with_devices(command, devices):
    environment = child_process.environment(devices)
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600, check=False
    )


def test_train_script_on_8_devices_matches_one_device(tmp_path):
    flags = [
        "--num-examples",
        "30",
        "--hidden",
        "16",
        "--steps",
        "40",
        "--eval-every",
        "20",
        "--checkpoint-every",
        "20",
        "--no-plots",
        "--no-progress",
    ]
    completed = run_with_devices(
        [sys.executable, "experiments/train.py", *flags, "--devices", "8", "--out", str(tmp_path)],
        devices=8,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "training data-parallel on 8" in completed.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["devices"] == 8 and metrics["config"]["devices"] == 8
    # the same run on this process's one device (90 points: padded to 96 on 8 devices)
    config = training.TrainConfig(hidden=(16,), steps=40, eval_every=20, checkpoint_every=20)
    one = training.train(config, data.load("spiral", num_examples=30))
    assert one.devices == 1
    np.testing.assert_allclose(metrics["final_loss"], one.final_loss, rtol=1e-5)
    assert metrics["train_accuracy"] == pytest.approx(one.train_accuracy, abs=1e-6)
    assert metrics["test_accuracy"] == pytest.approx(one.test_accuracy, abs=1e-6)


def test_train_script_names_a_device_count_beyond_the_local_devices(tmp_path):
    completed = run_with_devices(
        [sys.executable, "experiments/train.py", "--devices", "9", "--out", str(tmp_path)],
        devices=8,
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert (
        "--devices=9 asks for more devices than this process has: 8 local cpu device(s). "
        "Ask for at most 8"
    ) in completed.stderr
    assert "xla_force_host_platform_device_count" in completed.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_comparison_script_runs_on_a_tiny_case(tmp_path):
    completed = run_with_devices(
        [
            sys.executable,
            "experiments/data_parallel.py",
            "--devices",
            "8",
            "--steps",
            "5",
            "--num-examples",
            "20",
            "--hidden",
            "8",
            "--json",
            str(tmp_path / "table.json"),
        ],
        devices=8,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (row,) = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert row["devices"] == 8 and row["max_param_diff_1_vs_n"] < 1e-5


def test_one_device_process_refuses_two():
    assert jax.local_device_count() == 1
    with pytest.raises(ValueError, match=r"devices=2 asks for more devices .* 1 local"):
        training.train(
            training.TrainConfig(hidden=(4,), steps=1, eval_every=1, checkpoint_every=1, devices=2),
            data.load("spiral", num_examples=10),
        )
    with pytest.raises(ValueError, match=r"devices=0 must be a positive number"):
        training.TrainConfig(devices=0)

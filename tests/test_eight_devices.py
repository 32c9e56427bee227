"""Every check on 8 virtual CPU devices, in one child pytest.

JAX fixes its device count when it starts, so the checks that need 8 devices run in a child
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; this process keeps its
single device. The files, in ``tests/multidevice/``:

- ``check_sharded.py`` and ``check_sharded_linear.py``: the vocabulary-parallel losses' values
  and gradients against one device for every option, uneven vocabularies, the compiled
  program's collectives;
- ``check_mesh_types.py``: every kind of mesh, eagerly and under ``jit``, with and without
  ``jax.set_mesh``;
- ``check_data_parallel.py``: data-parallel training on every device count against one
  device, the compiled step's all-reduce, resume;
- ``check_sharded_token_log_probs.py``: the vocabulary-split token log-probabilities and
  entropy, values and gradients against the definitions;
- ``check_sharded_preference.py``: the vocabulary-split fused preference loss (with a
  reference model, packed rows), values, metrics and gradients against one device;
- ``check_frameworks.py``: docs/frameworks.md's optax training step with the sharded fused
  loss on a (2, 4) mesh, against the same model trained through its logits.

One child for all seven: each process costs about 3 s of CPU to start Python and JAX, and the
child loads tests/conftest.py too, so it is as strict as this run and shares its compilation
cache (check_mesh_types.py compiles one program many times over: a loss traced with and
without ``jax.set_mesh``, or called eagerly, jitted anew at each call, lowers to the same
program in several cases, and the repeats are loaded from it). A failure prints the child's
report.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import child_process
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS = [
    "check_sharded.py",
    "check_sharded_linear.py",
    "check_mesh_types.py",
    "check_data_parallel.py",
    "check_sharded_token_log_probs.py",
    "check_sharded_preference.py",
    "check_frameworks.py",
]


@pytest.mark.longest
def test_eight_device_checks_pass():
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-n",
        "0",  # one process: the parent already runs its workers on these cores
        "-p",
        "no:cacheprovider",
        *(f"tests/multidevice/{checks}" for checks in CHECKS),
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=child_process.environment(8),
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, f"8-device checks failed:\n{report}"
    assert " passed" in result.stdout and "failed" not in result.stdout, report

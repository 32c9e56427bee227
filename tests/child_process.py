"""The environment of the child processes the tests start (scripts, 8-device checks).

A child gets this process's environment (so ``XLA_FLAGS`` set by tests/conftest.py, and
``JAXSOFTMAX_NO_COMPILATION_CACHE``, reach it), the CPU platform, the repository on its
``PYTHONPATH`` and, where asked, ``devices`` virtual CPU devices in place of any device
count already in ``XLA_FLAGS``.
"""

from __future__ import annotations

import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def environment(devices: int | None = None, **extra: str) -> dict[str, str]:
    """``os.environ`` for a child process, with ``extra`` variables added."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if devices is not None:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env

"""Test configuration: JAX is strict here, so silent broadcasting or promotion fails."""

import os
import shutil
import subprocess
import sys
import tempfile

# Several test workers may share one GPU: take memory as needed instead of 75% each.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The scripts of experiments/ keep JAX's compiled programs in the user's cache folder
# ($XDG_CACHE_HOME/jaxsoftmax/jax-compilation-cache) unless this is set. Tests call their main()
# in this process and start them in child processes, which inherit it: the suite never reads or
# writes that folder, so it takes as long on a fresh machine as on one that ran it before
# (tests/test_experiments.py holds it).
os.environ["JAXSOFTMAX_NO_COMPILATION_CACHE"] = "1"

# The suite compiles a few thousand small programs and runs each for microseconds: LLVM's
# optimisation of their machine code is most of their compile time and saves nothing here
# (test_cross_entropy.py: 108 s -> 66 s without it). XLA's own passes still run, so the
# programs the tests read (fusions, collectives, buffer assignment, memory_analysis()) are
# the ones users get; only the CPU's machine code is less optimised, and no test times it.
# Child processes inherit the flag.
# LLVM also splits each program into parts compiled by threads of its own, which on two cores
# shared by two test workers only adds work (the optimized HLO is the same either way;
# test_optax_compatible.py: 33 -> 31 s of CPU time with one part).
# And XLA's CPU backend in JAX 0.10 emits each fusion through a pipeline of MLIR passes of its
# own (its "fusion emitters", one MLIR context per fusion), a third of the suite's compile
# time; its former emitters make the same fusions from the same optimized HLO, with the same
# buffers (memory_analysis() at Gemma 2's shape: 49.1 MiB in float32, 100.6 MiB in bf16,
# either way). test_linear_cross_entropy.py and test_optax_compatible.py: 94 -> 63 s of CPU
# without them; the whole suite 352 -> 231 s. JAX 0.12's XLA has only the new emitters and
# stops at the flag ("Unknown flag in XLA_FLAGS"), so the first process asks a child whether
# this XLA knows it (about 2 s of CPU, once a run); the workers and children inherit the answer.
TEST_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_parallel_codegen_split_count=1")
OPTIONAL_FLAG = "--xla_cpu_use_fusion_emitters=false"
ANSWER = "JAXSOFTMAX_SUITE_XLA_FLAGS_CHOSEN"  # "1", set by the first process


def _xla_knows(flag: str) -> bool:
    """Whether XLA starts with ``flag`` in ``XLA_FLAGS`` (an unknown flag ends the process)."""
    environment = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(command, env=environment, capture_output=True).returncode == 0


if ANSWER not in os.environ:
    flags = [
        flag for flag in TEST_FLAGS if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", "")
    ]
    if OPTIONAL_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", "") and _xla_knows(
        OPTIONAL_FLAG
    ):
        flags.append(OPTIONAL_FLAG)
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    os.environ[ANSWER] = "1"

# One compilation cache for the whole run, empty at its start and deleted at its end, shared by
# the test workers and every child process (they inherit the variables): a program that
# several processes compile (the training runs of the scripts, the one-device references) is
# compiled once. Writing it costs nothing measurable (test_cross_entropy.py: 31.1 s of CPU
# without the cache, 31.2 s filling it). The first process to load this file, pytest's own,
# makes the folder; tests that need a cache of their own (tests/test_experiments.py) set it.
if "JAXSOFTMAX_SUITE_CACHE" not in os.environ:
    os.environ["JAXSOFTMAX_SUITE_CACHE"] = tempfile.mkdtemp(prefix="jaxsoftmax-suite-cache-")
    os.environ["JAXSOFTMAX_SUITE_CACHE_OWNER"] = str(os.getpid())
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXSOFTMAX_SUITE_CACHE"]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# float32 matrix products in float32 on every backend. On recent NVIDIA GPUs JAX's default
# rounds their operands to TensorFloat-32 (10 bits of mantissa), and two float32 computations
# that sum in another order (chunked and whole, say) then differ by 1e-3 instead of 1e-6:
# the tests compare algorithms, at the precision the CPU always uses.
jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture
def standard_promotion():
    """optax 0.2.8's adam bias correction mixes a Python float with its int32 step count,
    which the strict promotion above refuses; users run with standard promotion. For the
    tests that train with adam (the language model and distillation experiments)."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def pytest_configure(config):
    _stop_if_xdist_groups_would_be_lost(config)
    config.addinivalue_line(
        "markers",
        "longest: one of the suite's longest tests (a child process, a whole script); run first",
    )


def pytest_unconfigure(config):
    """The run's compilation cache goes with the process that made it."""
    if os.environ.get("JAXSOFTMAX_SUITE_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAXSOFTMAX_SUITE_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Start the longest tests first, so that the two test workers end together.

    Collected in file order, the 8-device checks (over two minutes) began after half the suite
    had run and one worker ran on alone at the end. The sort is stable: the rest keep their order.
    """
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)


def _stop_if_xdist_groups_would_be_lost(config):
    """Several modules share compiled programs and cached results between their tests, and the
    modules that empty JAX's caches run on one worker: ``xdist_group`` with ``--dist loadgroup``.
    pytest-xdist 3.8 marks a test's group in a node id field that pytest 9.2 no longer reads,
    and the groups are silently dropped (pytest-xdist#1386): the suite then ran about a minute
    longer with nothing to say why. pyproject.toml keeps pytest below 9.2 until a fixed xdist.
    """
    if config.getoption("dist", "no") != "loadgroup":
        return
    from importlib.metadata import version

    def numbers(name):
        return tuple(int(part) for part in version(name).split(".")[:2] if part.isdigit())

    if numbers("pytest") >= (9, 2) and numbers("pytest-xdist") <= (3, 8):
        raise pytest.UsageError(
            f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} runs "
            "--dist loadgroup without its groups (pytest-xdist#1386): install the test "
            'extras, which keep pytest below 9.2: pip install -e ".[test]"'
        )

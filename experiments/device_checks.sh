#!/usr/bin/env bash
# The test suite and the benchmark on a GPU machine, in one command that ends in about ten
# minutes, for a machine that already has JAX's CUDA build, optax, pytest, pytest-xdist,
# hypothesis, matplotlib, scikit-learn and tqdm (nothing is installed: such a machine may have
# no network). Run from the repository's root:
#
#   bash experiments/device_checks.sh OUT            # logs in OUT, results in OUT/<platform>
#   PYTEST_ARGS="tests/test_benchmark.py" bash experiments/device_checks.sh OUT --quick
#
# Extra arguments go to experiments/benchmark.py. Each part has a time limit of its own
# (TESTS_SECONDS, BENCHMARK_SECONDS), so one that hangs leaves time and logs for the other.
set -uo pipefail
out=${1:?"usage: bash experiments/device_checks.sh OUT [benchmark arguments]"}
shift
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import jax, jaxlib, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee "$out/devices.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$out/devices.txt"
# Eight workers: the suite is mostly XLA compilation on the host's cores.
# shellcheck disable=SC2086
timeout "${TESTS_SECONDS:-300}" python3 -m pytest -q -n "${TEST_WORKERS:-8}" -p no:cacheprovider ${PYTEST_ARGS:-} >"$out/tests.log" 2>&1
echo "tests: exit $? (124: out of time); last lines of $out/tests.log:"
tail -n 15 "$out/tests.log"
platform=$(python3 -c "import jax; print(jax.devices()[0].platform)")
timeout "${BENCHMARK_SECONDS:-360}" python3 experiments/benchmark.py --fresh --out "$out/$platform" "$@" 2>&1 | tee "$out/benchmark.log"
echo "benchmark: exit ${PIPESTATUS[0]} (124: out of time); results in $out/$platform"

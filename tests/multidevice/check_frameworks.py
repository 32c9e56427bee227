"""docs/frameworks.md's mesh example on 8 virtual CPU devices: a (2, 4) mesh, the classifier
split over 4 devices and the sequences over 2.

Run by ``tests/test_eight_devices.py`` in its child pytest. The example runs as written (by
experiments/frameworks.py, as tests/test_frameworks.py runs it on one device): the model
trained with ``sharded_linear_cross_entropy`` equals the one trained through its logits with
optax's loss, and the trained classifier (so its gradient, optimizer state and update) stays
split by rows over ``"model"``.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "experiments_frameworks", _ROOT / "experiments" / "frameworks.py"
)
frameworks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frameworks)


def test_the_mesh_example_trains_as_the_logits_path_on_a_2_by_4_mesh(standard_promotion):
    if jax.device_count() != 8:
        pytest.fail(
            f"this check needs 8 devices; got {jax.device_count()}. Run it with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8."
        )
    run = frameworks.run(frameworks.examples()["optax"])
    assert run.printed.endswith(" on a mesh of {'data': 2, 'model': 4}\n"), run.printed
    np.testing.assert_allclose(
        run.fused_losses, run.logits_losses, rtol=frameworks.RTOL, atol=frameworks.ATOL
    )
    for name, fused in run.fused_params.items():
        logits = run.logits_params[name]
        np.testing.assert_allclose(fused, logits, rtol=frameworks.RTOL, atol=frameworks.ATOL)
    assert frameworks.agree(run)
    classifier = run.fused_params["classifier"]
    assert classifier.sharding.spec == P("model", None), classifier.sharding
    assert {shard.data.shape for shard in classifier.addressable_shards} == {(16, 16)}

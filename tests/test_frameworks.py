"""docs/frameworks.md's examples run as written (by experiments/frameworks.py), and in each the
model trained with the fused loss equals the same model trained through its logits with
optax's loss: losses and parameters within float32 tolerance after a few steps.

flax and equinox come with the test extras (``jaxsoftmax[frameworks]`` in pyproject.toml), so
these tests always run. The examples train with optax's adam, whose bias correction mixes a
Python float with its int32 step count: they run with standard dtype promotion, as users do
(the suite's default is strict: tests/conftest.py). The mesh example on a (2, 4) mesh of 8
virtual devices: tests/multidevice/check_frameworks.py.
"""

import functools
import importlib.util
import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "experiments_frameworks", ROOT / "experiments" / "frameworks.py"
)
frameworks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frameworks)

NAMES = ["flax.nnx", "equinox", "optax"]
# Each example runs once in this process and several tests read its result: one worker.
pytestmark = pytest.mark.xdist_group("frameworks")
PRINTED = re.compile(
    r"loss (\d+\.\d{4}) -> (\d+\.\d{4}) \(logits path (\d+\.\d{4})\), "
    r"parameters apart by at most (\S+)( on a mesh of \{.*\})?\n"
)


@functools.cache
def result(name: str):
    with jax.numpy_dtype_promotion("standard"):  # as standard_promotion, for the cache
        return frameworks.run(frameworks.examples()[name])


def test_the_page_has_one_example_for_each_framework():
    assert list(frameworks.examples()) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_fused_training_equals_logits_training(name):
    run = result(name)
    rtol = atol = frameworks.RTOL
    np.testing.assert_allclose(run.fused_losses, run.logits_losses, rtol=rtol, atol=atol)
    fused, logits = (jax.tree.leaves(p) for p in (run.fused_params, run.logits_params))
    assert jax.tree.structure(run.fused_params) == jax.tree.structure(run.logits_params)
    for a, b in zip(fused, logits, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    assert frameworks.agree(run)
    assert run.fused_losses.shape == (5,) and run.fused_losses[-1] < run.fused_losses[0] - 0.5


@pytest.mark.parametrize("name", NAMES)
def test_each_example_prints_what_it_computed(name):
    run = result(name)
    printed = PRINTED.fullmatch(run.printed)
    assert printed, run.printed
    first, last, logits_last, apart = printed.groups()[:4]
    assert float(first) == round(float(run.fused_losses[0]), 4)
    assert float(last) == round(float(run.fused_losses[-1]), 4)
    assert float(logits_last) == round(float(run.logits_losses[-1]), 4)
    assert float(apart) <= frameworks.ATOL
    if name == "optax":
        devices = jax.device_count()
        data = 2 if devices % 2 == 0 else 1  # the example's mesh
        mesh = {"data": data, "model": devices // data}
        assert printed.group(5) == f" on a mesh of {mesh}"


def test_the_flax_model_has_one_table_for_embedding_and_classifier():
    shapes = [a.shape for a in jax.tree.leaves(result("flax.nnx").fused_params)]
    assert shapes.count((64, 16)) == 1 and (16, 64) not in shapes, shapes


def test_the_script_reports_each_example_and_fails_on_a_difference(monkeypatch, capsys):
    """main() on the examples' results (run once above): status 0 and a line each; then with
    one parameter moved by 1e-3, status 1 and the example named."""
    by_code = {frameworks.examples()[name]: result(name) for name in NAMES}
    monkeypatch.setattr(frameworks, "run", by_code.__getitem__)
    monkeypatch.setenv("JAXSOFTMAX_NO_COMPILATION_CACHE", "1")
    assert frameworks.main([]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1::2]] == NAMES, out
    assert out.count("within 1e-05") == 3 and "NOT" not in out, out

    moved = result("equinox")._replace(
        fused_params=jax.tree.map(lambda a: a + 1e-3, result("equinox").fused_params)
    )
    by_code[frameworks.examples()["equinox"]] = moved
    assert frameworks.main([]) == 1
    out = capsys.readouterr().out
    assert "equinox" in out.splitlines()[-1] and "NOT within 1e-05" in out, out


def test_the_pages_table_gives_each_layers_layout():
    """The shapes docs/frameworks.md's table gives the layers' arrays, ``[V, d]`` or
    ``[d, V]`` (``classifier_layout="dv"``, whose loss and gradients
    tests/test_linear_cross_entropy.py holds to the logits')."""
    import equinox as eqx  # here, not at collection: each test worker collects this file
    from flax import nnx

    v, d = 64, 16  # shapes only: the layers are traced, not built
    table = nnx.eval_shape(lambda: nnx.Embed(v, d, rngs=nnx.Rngs(0))).embedding
    assert table.shape == (v, d)
    head = nnx.eval_shape(lambda: nnx.Linear(d, v, rngs=nnx.Rngs(0)))
    assert head.kernel.shape == (d, v) and head.bias.shape == (v,)
    head = eqx.filter_eval_shape(eqx.nn.Linear, d, v, key=jax.random.key(0))
    assert head.weight.shape == (v, d) and head.bias.shape == (v,)

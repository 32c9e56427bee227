"""The README's Python examples run as written, each on its own, and give what they claim."""

import functools
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import child_process
import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# The tests that read the one-device run of the blocks (run_alone) share a worker.
BLOCKS = pytest.mark.xdist_group("readme_blocks")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


@BLOCKS
def test_usage_example_runs_and_its_comments_hold():
    namespace = arrays_alone(0)
    logits, labels = namespace["logits"], namespace["labels"]

    @jax.jit  # the reference in one program, not one per operation
    def reference(logits, labels):
        s = jax.nn.softmax(logits)
        return -jnp.mean(jnp.log(s[jnp.arange(2), labels])), (s - jax.nn.one_hot(labels, 3)) / 2

    expected, expected_grad = reference(logits, labels)
    np.testing.assert_allclose(namespace["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(namespace["grad"], expected_grad, atol=1e-7)
    assert namespace["per_example"].shape == (2,)


@BLOCKS
def test_fused_example_runs_and_equals_logits_then_loss():
    namespace = arrays_alone(1)
    hidden, embedding = namespace["hidden"], namespace["embedding"]
    import jaxsoftmax

    naive = lambda h, w: jaxsoftmax.cross_entropy(h @ w.T, jnp.arange(8), z_loss=1e-4)
    expected, gradients = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(hidden, embedding)
    np.testing.assert_allclose(namespace["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(namespace["d_hidden"], gradients[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(namespace["d_embedding"], gradients[1], rtol=1e-5, atol=1e-7)


# Runs README blocks in one child Python, each as a reader pastes it into a fresh interpreter
# would: in a namespace of its own (a block that forgets an import, or uses a name another block
# defined, fails), its stdout and its error recorded apart. A child per block spent 3 s apiece
# starting Python and JAX. What one fresh Python gives a block and a shared one does not is
# JAX's global state untouched by earlier blocks: the runner fails a block that changes
# jax.config, so no block runs differently for the ones before it.
_BLOCK_RUNNER = r"""
import contextlib, io, json, sys, traceback
import jax

import numpy as np

results = []
for index, block in enumerate(json.loads(sys.stdin.read())):
    stdout, config = io.StringIO(), dict(jax.config.values)
    namespace = {"__name__": "__main__"}
    with contextlib.redirect_stdout(stdout):
        try:
            exec(compile(block, "<README block>", "exec"), namespace)
            changed = sorted(k for k, v in jax.config.values.items() if config.get(k) != v)
            error = f"changed JAX's global configuration: {changed}" if changed else None
        except BaseException:
            error = traceback.format_exc()
    arrays = {}  # the block's arrays, for the tests that check what it computed
    for name, value in namespace.items():
        leaves = jax.tree_util.tree_flatten_with_path(value)[0]
        if name.startswith("_") or not leaves:
            continue
        if all(isinstance(x, jax.Array) for _, x in leaves):
            with contextlib.suppress(TypeError, ValueError):  # PRNG keys are no numbers
                kept = {name + jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
                arrays.update(kept)
    np.savez(f"{sys.argv[1]}/{index}.npz", **arrays)
    results.append([stdout.getvalue(), error])
print(json.dumps(results))
"""


@functools.cache
def run_alone(blocks: tuple[str, ...], devices: int = 1) -> list[tuple[str, str | None, dict]]:
    """``(stdout, error or None, arrays)`` of each of ``blocks`` run on ``devices`` CPU devices
    by one child Python (``_BLOCK_RUNNER``); ``arrays`` holds the arrays the block left in its
    namespace (``name``, ``name.field`` or ``name[i]`` for named tuples and tuples), as NumPy
    arrays. Once per blocks and device count in a test process (the tests that read a run
    share one worker: xdist_group "readme_blocks")."""
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run(
            [sys.executable, "-c", _BLOCK_RUNNER, folder],
            input=json.dumps(blocks),
            env=child_process.environment(devices),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs = json.loads(result.stdout.splitlines()[-1])
        arrays = []
        for index in range(len(runs)):
            with np.load(pathlib.Path(folder) / f"{index}.npz") as saved:
                arrays.append(dict(saved))
    return [(printed, error, kept) for (printed, error), kept in zip(runs, arrays)]


def printed_alone(index: int, devices: int = 1) -> str:
    """What README block ``index`` printed run alone (with the others' one-device run), failing
    with the block's number and its traceback if it raised."""
    return _run(index, devices)[0]


def arrays_alone(index: int) -> dict[str, np.ndarray]:
    """The arrays README block ``index`` computed, run alone by the one-device run (the blocks
    run there, as a reader runs them, and not again in this process: a block run here compiled
    a program per operation, some 20 programs a block)."""
    return _run(index, 1)[1]


def _run(index, devices):
    blocks = tuple(python_blocks())
    if devices == 1:
        printed, error, arrays = run_alone(blocks)[index]
    else:
        ((printed, error, arrays),) = run_alone(blocks[index : index + 1], devices)
    assert error is None, f"README block {index} on {devices} device(s):\n{error[-3000:]}"
    return printed, arrays


@BLOCKS
@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 5, 6])
def test_every_block_runs_alone_and_prints_what_it_computes(index):
    assert len(python_blocks()) == 7, "a new README block: add it here"
    printed = printed_alone(index)
    assert re.match(r"loss -?\d+\.\d{4}", printed), f"README block {index}: {printed}"


@BLOCKS
def test_mesh_example_on_eight_devices_equals_one_device():
    """The mesh block on a (2, 4) mesh of virtual devices gives one device's loss."""
    one, eight = printed_alone(2), printed_alone(2, devices=8)
    assert "{'data': 1, 'model': 1}" in one and "{'data': 2, 'model': 4}" in eight, eight
    loss = lambda printed: float(re.match(r"loss (\S+)", printed).group(1))
    assert loss(one) == loss(eight)


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run says it runs the README's install-and-test command; keep the two equal."""
    text = README.read_text()
    command = re.search(r"The tests:\n\n {4}(.+)\n", text).group(1)
    assert command == 'pip install -e ".[test]" && pytest'
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert command in ci, f"{command!r} is not a line of .ci/run"


@BLOCKS
def test_aux_example_equals_the_logits_composition():
    """The companions of README's fourth block against their definitions on the logits."""
    namespace = arrays_alone(3)
    hidden, embedding = namespace["hidden"], namespace["embedding"]
    aux = {field: namespace[f"aux.{field}"] for field in ("lse", "entropy", "z_loss", "correct")}
    assert np.all(namespace["grads[1]"][1000:] == 0)  # no gradient to the padding

    @jax.jit  # the definitions in one program, not one per operation
    def definitions(hidden, embedding):
        logits = jnp.where(jnp.arange(1024) < 1000, hidden @ embedding.T, -jnp.inf)
        logp = jax.nn.log_softmax(logits)
        lse = jax.nn.logsumexp(logits, -1)
        p = jnp.exp(logp)
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp, 0.0), 0.0), -1)
        return lse, entropy, 1e-4 * lse**2, jnp.argmax(logits, -1) == jnp.arange(8)

    lse, entropy, z_loss, correct = definitions(hidden, embedding)
    np.testing.assert_allclose(aux["lse"], lse, rtol=1e-5)
    np.testing.assert_allclose(aux["entropy"], entropy, atol=1e-4)
    np.testing.assert_allclose(aux["z_loss"], z_loss, rtol=1e-5)
    np.testing.assert_array_equal(aux["correct"], correct)


@BLOCKS
def test_distillation_example_equals_the_naive_composition():
    """The fifth block's fused loss and student gradients against ``T^2 KL(q || p)`` + half
    the cross-entropy, written with ``jax.nn.log_softmax`` and differentiated by JAX."""
    namespace = arrays_alone(4)
    h_t, w_t = namespace["teacher_hidden"], namespace["teacher_embedding"]
    labels = namespace["labels"]

    def naive(h, w):
        log_p = jax.nn.log_softmax(h @ w.T / 2.0)
        log_q = jax.nn.log_softmax(h_t @ w_t.T / 2.0)
        kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(h @ w.T), labels[:, None], -1)[:, 0]
        return jnp.mean(4.0 * kl + 0.5 * nll)

    arguments = (namespace["student_hidden"], namespace["student_embedding"])
    expected, gradients = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(*arguments)
    np.testing.assert_allclose(namespace["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(namespace["from_logits"], expected, rtol=1e-5)
    for i, want in enumerate(gradients):
        np.testing.assert_allclose(namespace[f"grads[{i}]"], want, rtol=1e-4, atol=1e-6)


@BLOCKS
def test_reinforcement_learning_example_equals_the_logits_composition():
    """The sixth block's GRPO loss and gradients against the same loss written on the logits
    with ``jax.nn.log_softmax`` (on-policy: ratio 1, so the clipped term is ``-A log p``'s
    value and gradient), differentiated by JAX, and its ratio exactly 1."""
    namespace = arrays_alone(5)
    tokens, mask, advantages = namespace["tokens"], namespace["mask"], namespace["advantages"]

    def naive(h, w):
        log_p_all = jax.nn.log_softmax(h @ w.T / 0.8)
        log_p = jnp.take_along_axis(log_p_all, tokens[..., None], -1)[..., 0]
        entropy = -jnp.sum(jnp.exp(log_p_all) * log_p_all, -1)
        ratio = jnp.exp(log_p - jax.lax.stop_gradient(log_p))
        per_token = -ratio * advantages[:, None] - 0.01 * entropy
        per_sequence = jnp.sum(jnp.where(mask, per_token, 0.0), 1) / jnp.sum(
            mask.astype(jnp.float32), 1
        )
        return jnp.mean(per_sequence)

    arguments = (namespace["hidden"], namespace["embedding"])
    expected, gradients = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(*arguments)
    np.testing.assert_allclose(namespace["loss"], expected, rtol=1e-5, atol=1e-6)
    for i, want in enumerate(gradients):
        np.testing.assert_allclose(namespace[f"grads[{i}]"], want, rtol=1e-4, atol=1e-6)
    assert namespace["metrics.ratio_mean"] == 1.0


@BLOCKS
def test_preference_example_equals_dpo_on_the_logits():
    """The seventh block's DPO loss and gradients against DPO written on both models' logits
    with ``jax.nn.log_softmax`` (chosen rows 0 and 2, rejected 1 and 3), differentiated by JAX;
    the reference gets no gradient."""
    namespace = arrays_alone(6)
    tokens, mask = namespace["tokens"], namespace["mask"]
    reference_hidden, reference_embedding = namespace["reference[0]"], namespace["reference[1]"]

    def sums(h, w):
        log_p = jnp.take_along_axis(jax.nn.log_softmax(h @ w.T), tokens[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(mask, log_p, 0.0), 1)

    def naive(h, w):
        ratios = sums(h, w) - sums(reference_hidden, reference_embedding)
        u = ratios[0::2] - ratios[1::2]
        return jnp.mean(-jax.nn.log_sigmoid(0.1 * u))

    arguments = (namespace["hidden"], namespace["embedding"])
    expected, gradients = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(*arguments)
    np.testing.assert_allclose(namespace["loss"], expected, rtol=1e-5, atol=1e-6)
    for i, want in enumerate(gradients):
        np.testing.assert_allclose(namespace[f"grads[{i}]"], want, rtol=1e-4, atol=1e-6)
    assert namespace["metrics.pair_count"] == 2

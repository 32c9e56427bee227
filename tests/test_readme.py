"""The README's single-device Python examples run and give what they claim."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_usage_example_runs_and_its_comments_hold():
    namespace = {}
    exec(python_blocks()[0], namespace)
    logits, labels = namespace["logits"], namespace["labels"]
    s = jax.nn.softmax(logits)
    expected = -jnp.mean(jnp.log(s[jnp.arange(2), labels]))
    np.testing.assert_allclose(namespace["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(namespace["grad"], (s - jax.nn.one_hot(labels, 3)) / 2, atol=1e-7)
    assert namespace["per_example"].shape == (2,)


def test_fused_example_runs_and_equals_logits_then_loss():
    namespace = {"jnp": jnp}
    exec("import jax, jax.numpy as jnp\nimport jaxsoftmax\n" + python_blocks()[1], namespace)
    hidden, embedding = namespace["hidden"], namespace["embedding"]
    import jaxsoftmax

    expected = jaxsoftmax.cross_entropy(hidden @ embedding.T, jnp.arange(8), z_loss=1e-4)
    np.testing.assert_allclose(namespace["loss"], expected, rtol=1e-6)


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run says it runs the README's install-and-test command; keep the two equal."""
    text = README.read_text()
    command = re.search(r"The tests:\n\n {4}(.+)\n", text).group(1)
    assert command == 'pip install -e ".[test]" && pytest'
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert command in ci, f"{command!r} is not a line of .ci/run"

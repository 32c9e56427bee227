"""Checked mode: labels out of range raise, eagerly in Python and under jit via checkify."""

import functools

import jax
import numpy as np
import pytest
import reference
import sample
from jax.experimental import checkify

import jaxsoftmax
import jaxsoftmax.losses.cross_entropy
from jaxsoftmax import cross_entropy
from jaxsoftmax import softmax_cross_entropy_with_integer_labels as integer_loss

# JAX arrays, made from NumPy ones with device_put: an eager jnp.array or .at[].set compiles a
# program at import.
LOGITS = sample.normal(5, (2, 3, 4), scale=2.0)
FIRST_LOGITS = jax.device_put(np.asarray(LOGITS)[0])  # LOGITS[0], without a slicing program
_LABELS = np.array([[0, 1, 2], [3, 9, 1]], np.int32)  # 9 is out of range, at position [1 1]
LABELS = jax.device_put(_LABELS)


def with_label(labels, position, value):
    """``labels.at[position].set(value)``, edited in NumPy."""
    edited = np.array(labels)
    edited[position] = value
    return jax.device_put(edited)


GOOD = with_label(_LABELS, (1, 1), 2)
CHECKED_CE = functools.partial(cross_entropy, checked=True)
CHECKED_INT = functools.partial(integer_loss, checked=True)
LOSSES = [(CHECKED_CE, "targets"), (CHECKED_INT, "labels")]
IDS = ["cross_entropy", "integer_dropin"]


@pytest.mark.parametrize("loss,name", LOSSES, ids=IDS)
def test_eager_call_raises_a_value_error_before_any_computation(monkeypatch, loss, name):
    """No wrapper needed when the labels are known in Python; nothing is computed."""

    def no_computation(*args, **kwargs):
        raise AssertionError("computed before checking the labels")

    monkeypatch.setattr(jaxsoftmax.losses.cross_entropy, "rows_and_weights", no_computation)
    with pytest.raises(
        ValueError,
        match=rf"^{name} out of range: found label 9 at position \[1 1\]; expected "
        r"0 <= label < 4( or label == ignore_index \(-100\))?\.",  # cross_entropy's default
    ):
        loss(LOGITS, LABELS)


def test_messages_are_worded_for_each_function():
    """cross_entropy has ignore_index (-100 by default); the drop-ins do not, and do not
    mention it."""
    with pytest.raises(
        ValueError, match=r"< 4\. Leave an example out with ignore_index= or where="
    ):
        CHECKED_CE(LOGITS, LABELS, ignore_index=None)
    with pytest.raises(ValueError, match=r"< 4 or label == ignore_index \(-100\)\."):
        CHECKED_CE(LOGITS, LABELS)
    with pytest.raises(ValueError) as info:
        CHECKED_INT(LOGITS, LABELS)
    assert "ignore_index" not in str(info.value)
    assert str(info.value).endswith("< 4. Leave an example out with where=.")


def test_eager_check_skips_ignored_and_masked_examples_and_passes_good_labels():
    np.testing.assert_allclose(
        CHECKED_CE(LOGITS, LABELS, ignore_index=9), cross_entropy(LOGITS, LABELS, ignore_index=9)
    )
    rows = jax.device_put(np.array([[True, True, True], [True, False, True]]))
    np.testing.assert_allclose(
        CHECKED_INT(LOGITS, LABELS, where=rows), integer_loss(LOGITS, LABELS, where=rows)
    )
    np.testing.assert_allclose(CHECKED_CE(LOGITS, GOOD), cross_entropy(LOGITS, GOOD))
    with pytest.raises(ValueError, match=r"found label -1 at position \[0 2\]"):
        CHECKED_CE(LOGITS, with_label(GOOD, (0, 2), -1))


@pytest.mark.parametrize("loss,name", LOSSES, ids=IDS)
@pytest.mark.parametrize("transform", [jax.jit, jax.vmap], ids=["jit", "vmap"])
def test_traced_labels_without_the_wrapper_raise_a_clear_error(loss, name, transform):
    """Not JAX's 'checkify.check which was not functionalized', whatever the labels are."""
    for labels in (LABELS, GOOD):
        with pytest.raises(
            ValueError,
            match=rf"checked=True cannot check {name} here: they are traced.*does not run under "
            r"jaxsoftmax\.checked.*jaxsoftmax\.checked\(jax\.jit\(loss_fn\)\)",
        ):
            transform(functools.partial(loss))(LOGITS, labels)


@pytest.mark.parametrize("loss,name", LOSSES, ids=IDS)
def test_checked_outside_jit_names_the_bad_label_and_its_position(loss, name):
    f = jaxsoftmax.checked(jax.jit(functools.partial(loss)))
    with pytest.raises(
        checkify.JaxRuntimeError,
        match=rf"{name} out of range: found label 9 at position \[1 1\]; expected 0 <= label < 4",
    ):
        f(LOGITS, LABELS)
    # against float64 NumPy (not the eager loss: one program fewer)
    want = reference.cross_entropy(LOGITS, GOOD, reduction="mean" if loss is CHECKED_CE else "none")
    np.testing.assert_allclose(f(LOGITS, GOOD), want, rtol=1e-6)


def test_checked_inside_jit_fails_with_a_clear_error():
    """``checked`` must be the outermost wrapper, whatever the labels are."""
    f = jax.jit(jaxsoftmax.checked(functools.partial(CHECKED_CE)))
    for labels in (LABELS, GOOD):
        with pytest.raises(ValueError, match=r"jaxsoftmax\.checked must be the outermost wrapper"):
            f(LOGITS, labels)


def test_throw_false_returns_the_error_and_can_be_jitted():
    f = jax.jit(jaxsoftmax.checked(functools.partial(CHECKED_CE), throw=False))
    error, value = f(LOGITS, LABELS)
    assert "found label 9 at position [1 1]" in error.get()
    with pytest.raises(checkify.JaxRuntimeError, match="found label 9"):
        error.throw()
    error, value = f(LOGITS, GOOD)
    assert error.get() is None
    np.testing.assert_allclose(value, cross_entropy(LOGITS, GOOD), rtol=1e-6)


def test_checked_skips_ignored_labels_under_jit():
    labels = jax.device_put(np.array([0, -100, 2], np.int32))
    f = jaxsoftmax.checked(jax.jit(functools.partial(CHECKED_CE, ignore_index=-100)))
    want = reference.cross_entropy(FIRST_LOGITS, labels, ignore_index=-100)  # float64 NumPy
    np.testing.assert_allclose(f(FIRST_LOGITS, labels), want, rtol=1e-6)
    with pytest.raises(checkify.JaxRuntimeError, match=r"label -100 at position \[1\]"):
        jaxsoftmax.checked(jax.jit(functools.partial(CHECKED_INT)))(FIRST_LOGITS, labels)


def test_a_jitted_function_traced_under_checked_keeps_its_check_as_documented():
    """The documented caveat of :func:`jaxsoftmax.checked`: JAX caches the trace."""
    f = jax.jit(lambda z, y: cross_entropy(z, y, checked=True))
    jaxsoftmax.checked(f)(LOGITS, GOOD)
    with pytest.raises(ValueError, match="checkify.check which was not functionalized"):
        f(LOGITS, GOOD)


def test_sharded_cross_entropy_checks_eagerly_and_under_checked():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    loss = functools.partial(
        jaxsoftmax.sharded_cross_entropy, mesh=mesh, class_axis_name="vocab", checked=True
    )
    with pytest.raises(
        ValueError, match=r"targets out of range: found label 9 at position \[1 1\]"
    ):
        loss(LOGITS, LABELS)
    with pytest.raises(ValueError, match=r"does not run under jaxsoftmax\.checked"):
        jax.jit(loss)(LOGITS, LABELS)
    with pytest.raises(checkify.JaxRuntimeError, match=r"found label 9 at position \[1 1\]"):
        jaxsoftmax.checked(jax.jit(loss))(LOGITS, LABELS)
    np.testing.assert_allclose(loss(LOGITS, GOOD), cross_entropy(LOGITS, GOOD), rtol=1e-6)

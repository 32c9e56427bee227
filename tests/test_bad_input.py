"""Bad input raises a TypeError or ValueError before any computation, naming the argument,
what was given and what was expected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsoftmax import cross_entropy, softmax_cross_entropy
from jaxsoftmax import softmax_cross_entropy_with_integer_labels as integer_loss


# JAX arrays made from NumPy ones with jax.device_put, in jnp's default dtypes (float32,
# int32): jnp.zeros, jnp.array or a comparison, run eagerly, compile a program each.
def array(values):
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        values = values.astype(np.int32)
    elif values.dtype.kind == "f":
        values = values.astype(np.float32)
    return jax.device_put(values)


def zeros(shape, dtype=np.float32):
    return jax.device_put(np.zeros(shape, dtype))


def ones(shape, dtype=np.float32):
    return jax.device_put(np.ones(shape, dtype))


def full(shape, value):
    return jax.device_put(np.full(shape, value, np.float32))


def positive(x):
    """``x > 0``."""
    return jax.device_put(np.asarray(x) > 0)


LOGITS = zeros((4, 3))
LABELS = array([0, 1, 2, 0])
PROBS = full((4, 3), 1 / 3)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (
            lambda: cross_entropy(zeros((4, 3), jnp.int32), LABELS),
            TypeError,
            r"logits must be a floating-point array.*int32 array of shape \(4, 3\)",
        ),
        (lambda: cross_entropy(jnp.float32(1.0), LABELS), ValueError, r"logits must have at least"),
        (
            lambda: cross_entropy(LOGITS, array([0, 1, 2])),
            ValueError,
            r"targets must have the logits' shape without the class axis, \(4,\); got int32 array "
            r"of shape \(3,\)",
        ),
        (
            lambda: cross_entropy(LOGITS, zeros((4, 1), jnp.int32)),
            ValueError,
            r"\(4,\); got int32 array of shape \(4, 1\).*Nothing is broadcast",
        ),
        (
            lambda: cross_entropy(LOGITS, full((4, 2), 0.5)),
            ValueError,
            r"targets must have the logits' shape \(4, 3\); got float32 array of shape \(4, 2\)",
        ),
        (
            lambda: cross_entropy(LOGITS, zeros((4, 3), jnp.int32)),
            ValueError,
            r"one-hot integers\? pass them as floats",
        ),
        (
            lambda: integer_loss(LOGITS, PROBS),
            TypeError,
            r"labels must be integer class indices.*looks like probabilities.*softmax_cross_entropy",
        ),
        (
            lambda: integer_loss(LOGITS, array([0.0, 1.0, 2.0, 0.0])),
            TypeError,
            r"labels must be integer class indices of shape \(4,\); got float32",
        ),
        (
            lambda: softmax_cross_entropy(LOGITS, LABELS),
            TypeError,
            r"labels must be float probabilities.*looks like integer class indices.*"
            r"softmax_cross_entropy_with_integer_labels",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, axis=2),
            ValueError,
            r"axis 2 is out of range for logits with 2 dimension\(s\); expected an axis in \[-2, 1\]",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, axis=1.5),
            TypeError,
            r"axis must be an int or a tuple of ints; got 1.5",
        ),
        (lambda: cross_entropy(LOGITS, LABELS, axis=(1, -1)), ValueError, r"names the same axis"),
        (lambda: cross_entropy(LOGITS, LABELS, axis=()), ValueError, r"at least one class axis"),
        (lambda: integer_loss(LOGITS, LABELS, None), TypeError, r"axis must be .*got None"),
        (
            lambda: cross_entropy(LOGITS, LABELS, reduction="avg"),
            ValueError,
            r"reduction must be one of \('mean', 'sum', 'none'\); got 'avg'",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, label_smoothing=-0.1),
            ValueError,
            r"label_smoothing must be >= 0.0 and <= 1.0; got -0.1",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, label_smoothing=1.5),
            ValueError,
            r"label_smoothing must be <= 1.0; got 1.5",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, label_smoothing=jnp.float32(0.1)),
            TypeError,
            r"label_smoothing must be a Python float",
        ),
        (lambda: cross_entropy(LOGITS, LABELS, z_loss=-1.0), ValueError, r"z_loss must be >= 0"),
        (
            lambda: cross_entropy(LOGITS, LABELS, z_loss=float("nan")),
            ValueError,
            r"z_loss must be finite",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, logit_softcap=0.0),
            ValueError,
            r"logit_softcap must be > 0.0; got 0.0",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, class_weights=ones(4)),
            ValueError,
            r"class_weights must have one weight per class, shape \(3,\); got float32 array of "
            r"shape \(4,\)",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, class_weights=ones(3, jnp.int32)),
            TypeError,
            r"class_weights must be a float array",
        ),
        (
            lambda: cross_entropy(LOGITS, PROBS, ignore_index=0),  # the default -100 is moot
            ValueError,
            r"ignore_index applies to integer class-index targets only",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, ignore_index=1.0),
            TypeError,
            r"ignore_index must be an int or None; got 1.0",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, where=ones((4,), jnp.int32)),
            TypeError,
            r"where must be a boolean array; got int32",
        ),
        (
            lambda: cross_entropy(LOGITS, LABELS, where=ones((4, 1), bool)),
            ValueError,
            r"where must have the shape of one example per row, \(4,\), or of the logits, \(4, 3\); "
            r"got bool array of shape \(4, 1\)",
        ),
        (lambda: cross_entropy(LOGITS, "labels"), TypeError, r"targets must be an array; got str"),
        (
            lambda: cross_entropy(zeros((4, 0)), zeros((4,), jnp.int32)),
            ValueError,
            r"logits must have at least one class; got logits of shape \(4, 0\), whose class "
            r"axis 1 has size 0\. Expected a class axis of size >= 1",
        ),
        (
            lambda: integer_loss(zeros((4, 0)), zeros((4,), jnp.int32)),
            ValueError,
            r"logits must have at least one class; got logits of shape \(4, 0\)",
        ),
        (
            lambda: softmax_cross_entropy(zeros((4, 0)), zeros((4, 0))),
            ValueError,
            r"logits must have at least one class; got logits of shape \(4, 0\)",
        ),
        (
            lambda: cross_entropy(zeros((0, 3)), zeros((3,), jnp.int32), axis=0),
            ValueError,
            r"logits of shape \(0, 3\), whose class axis 0 has size 0",
        ),
        (
            lambda: integer_loss(zeros((2, 0, 3)), zeros((2,), jnp.int32), (1, 2)),
            ValueError,
            r"logits of shape \(2, 0, 3\), whose class axes \(1, 2\) hold 0 classes",
        ),
        (
            lambda: softmax_cross_entropy(zeros((0,)), zeros((0,)), None),
            ValueError,
            r"logits of shape \(0,\), whose class axis 0 has size 0",
        ),
        (
            lambda: cross_entropy(LOGITS, positive(PROBS)),
            TypeError,
            r"targets must be integer class indices of shape \(4,\) or float probabilities of "
            r"shape \(4, 3\); got bool array of shape \(4, 3\): booleans are neither class "
            r"indices nor probabilities\. A one-hot mask\? Use targets\.astype\(jnp\.float32\)",
        ),
        (
            lambda: cross_entropy(LOGITS, positive(LABELS)),
            TypeError,
            r"got bool array of shape \(4,\): booleans are neither.*Class indices 0 and 1\? Use "
            r"targets\.astype\(jnp\.int32\)",
        ),
        (
            lambda: softmax_cross_entropy(LOGITS, positive(PROBS)),
            TypeError,
            r"labels must be float probabilities of shape \(4, 3\); got bool array of shape "
            r"\(4, 3\): booleans are neither",
        ),
        (
            lambda: integer_loss(LOGITS, positive(LABELS)),
            TypeError,
            r"labels must be integer class indices of shape \(4,\); got bool array of shape "
            r"\(4,\): booleans are neither.*labels\.astype\(jnp\.int32\)",
        ),
        (
            lambda: integer_loss(LOGITS, zeros((2,), bool)),
            TypeError,
            r"got bool array of shape \(2,\): booleans are neither.*Cast them",
        ),
        # axis_name= outside shard_map: JAX's NameError came from a psum eleven frames deep.
        (
            lambda: cross_entropy(LOGITS, LABELS, axis_name="vocab"),
            ValueError,
            r"axis_name='vocab': no mapped axis 'vocab' here\. axis_name= is for a loss called "
            r"inside jax\.shard_map.*jaxsoftmax\.sharded_cross_entropy\(logits, labels, mesh=",
        ),
        (
            lambda: integer_loss(LOGITS, LABELS, axis_name=("data", "vocab")),
            ValueError,
            r"axis_name=\('data', 'vocab'\): no mapped axis 'data' here",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_errors_raise_at_trace_time_under_jit_before_any_computation():
    traced = []

    def loss(z, y):
        traced.append(True)
        return cross_entropy(z, y, reduction="nope")

    with pytest.raises(ValueError, match="reduction must be one of"):
        jax.jit(loss)(LOGITS, LABELS)
    with pytest.raises(ValueError, match=r"targets must have the logits' shape without"):
        jax.jit(cross_entropy)(LOGITS, array([0, 1]))


def test_numpy_and_list_inputs_are_accepted():
    value = cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]))
    np.testing.assert_allclose(value, np.log(3.0), rtol=1e-6)
    value = cross_entropy([[0.0, 0.0], [0.0, 0.0]], [0, 1])
    np.testing.assert_allclose(value, np.log(2.0), rtol=1e-6)

"""``sharded_linear_distillation_loss``: the fused distillation with both classifiers split by
vocabulary over a mesh axis.

Each device holds ``V / S`` rows of the student's and of the teacher's classifier (the same
classes for both) and runs :func:`jaxsoftmax.linear_distillation_loss`'s tile loop over them
(``axis_name`` in its plan). The devices combine per-row numbers only: a ``pmax`` of each
model's running maximum, a ``psum`` of the rescaled sums of exponentials, of the KL's cross
term (or, for the JSD, of its two KL sums after the second pass) and, with ``hard_weight``,
of the label logits. The gradients of both classifiers land sharded like them; the hidden
states' gradients are sums over the vocabulary shards (one all-reduce each, as in any
vocabulary-parallel classifier). Tokens may also be split over a batch axis. A vocabulary
that does not divide by the number of shards is padded (the classifiers get zero rows,
masked out of every sum), as in :func:`jaxsoftmax.sharded_linear_cross_entropy`.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsoftmax.checks.distillation_call import DistillationCall, check_linear_distillation
from jaxsoftmax.checks.mesh_axes import AxisName, check_tokens_divide, mesh_axes
from jaxsoftmax.core.reduction import reduce_loss
from jaxsoftmax.losses.linear_distillation import linear_distillation_loss
from jaxsoftmax.losses.mesh_options import array_options, takes_options_of
from jaxsoftmax.tiles import distillation as fused
from jaxsoftmax.tiles.mesh import (
    MeshLayout,
    head_inputs,
    local_head,
    on_explicit_axes,
    pad_classes,
    run_sharded,
    vocabulary_split,
)


@takes_options_of(linear_distillation_loss)
def sharded_linear_distillation_loss(
    student_hidden: jax.typing.ArrayLike,
    student_classifier: jax.typing.ArrayLike,
    teacher_hidden: jax.typing.ArrayLike,
    teacher_classifier: jax.typing.ArrayLike,
    *,
    mesh: Mesh,
    class_axis_name: AxisName,
    batch_axis_name: AxisName | None = None,
    **options,
) -> jax.Array:
    r""":func:`~jaxsoftmax.linear_distillation_loss` with both classifiers split by vocabulary.

    Runs the fused distillation under ``jax.shard_map``: both classifiers ``[V, d]`` are
    split by rows over ``class_axis_name`` (``[d, V]`` with ``classifier_layout="dv"``: by
    columns), the biases likewise; with ``batch_axis_name`` the tokens (``student_hidden``,
    ``teacher_hidden``, ``labels``, ``where``) are split over it. Only per-row numbers cross
    devices in the loss. Value and gradients equal the single-device
    ``linear_distillation_loss`` with the same arguments; the classifiers' and biases'
    gradients come back split like them.

    Args:
      student_hidden, student_classifier, teacher_hidden, teacher_classifier: as in
        :func:`~jaxsoftmax.linear_distillation_loss`; the number of tokens must divide by
        the batch axis's size.
      mesh: the ``jax.sharding.Mesh`` (axes ``Auto`` or ``Explicit``).
      class_axis_name: the mesh axis (or tuple of axes) the vocabulary is split over.
      batch_axis_name: the mesh axis (or axes) the tokens are split over, or None.
      labels, divergence, temperature, beta, hard_weight, where, ignore_index, vocab_mask,
        reduction, student_bias, teacher_bias, classifier_layout, token_chunk, vocab_chunk,
        checked: as in :func:`~jaxsoftmax.linear_distillation_loss`; the chunks tile each device's
        ``[N / B, V / S]`` share.

    Returns:
      The reduced loss (a scalar, replicated), or with ``reduction="none"`` the per-token
      losses, split over ``batch_axis_name``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jaxsoftmax import linear_distillation_loss
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
      >>> keys = jax.random.split(jax.random.key(0), 4)
      >>> h_s, W_s = jax.random.normal(keys[0], (6, 4)), jax.random.normal(keys[1], (10, 4))
      >>> h_t, W_t = jax.random.normal(keys[2], (6, 8)), jax.random.normal(keys[3], (10, 8))
      >>> loss = sharded_linear_distillation_loss(h_s, W_s, h_t, W_t, mesh=mesh,
      ...                                         class_axis_name="vocab", temperature=2.0)
      >>> one = linear_distillation_loss(h_s, W_s, h_t, W_t, temperature=2.0)
      >>> print(bool(jnp.allclose(loss, one, atol=1e-6)))
      True
    """
    class_names, batch_names = mesh_axes(mesh, class_axis_name, batch_axis_name)
    # The single-device checks and messages, on the global arrays.
    call = check_linear_distillation(
        student_hidden, student_classifier, teacher_hidden, teacher_classifier, **options
    )
    check_tokens_divide(call.student.hidden.shape[0], mesh, batch_names, batch_axis_name,
                        "the hidden states' leading axes, flattened")  # fmt: skip
    given = (student_hidden, student_classifier, teacher_hidden, teacher_classifier,
             array_options(options))  # fmt: skip
    layout = MeshLayout(mesh, class_names, batch_names, on_explicit_axes(mesh, given))
    arrays = (call.student, call.teacher, call.labels, call.row_mask, call.vocab_mask)
    settings = call._replace(
        student=None, teacher=None, labels=None, row_mask=None, vocab_mask=None
    )
    out = _sharded_loss(*arrays, settings=settings, layout=layout)
    if call.options.reduction == "none":
        out = out.reshape(call.batch)
    return out.astype(call.student.hidden.dtype)


@functools.partial(jax.jit, static_argnames=("settings", "layout"))
def _sharded_loss(student, teacher, labels, row_mask, vocab_mask, *,
                  settings: DistillationCall, layout: MeshLayout):  # fmt: skip
    """The loss after the checks, compiled once per mesh, settings and shapes."""
    num_local, padding = vocabulary_split(settings.num_classes, layout)
    pad = functools.partial(pad_classes, layout=layout, padding=padding)
    rows = P(layout.batch)
    inputs = {}
    for name, model in (("student", student), ("teacher", teacher)):
        inputs |= head_inputs(model, layout, settings.tiles.layout, padding, prefix=f"{name}_")
    inputs["labels"] = (labels, rows)
    inputs["row_mask"] = (row_mask, rows)
    if vocab_mask is not None:  # global on every shard
        vocab_mask = pad(vocab_mask, axis=0, spec=P(), value=False)
    inputs["vocab_mask"] = (vocab_mask, P())
    local = functools.partial(_local_loss, settings=settings, layout=layout, num_local=num_local)
    out_spec = rows if settings.options.reduction == "none" else P()
    return run_sharded(local, layout, inputs, out_spec)


def _local_loss(local: dict, *, settings: DistillationCall, layout: MeshLayout, num_local: int):
    """One device's loss: the fused distillation over its vocabulary shard, reduced over the
    batch shards."""
    student, teacher = local_head(local, "student_"), local_head(local, "teacher_")
    plan = fused.make_plan(settings, student, teacher, num_local, axis_name=layout.classes)
    loss, weight = fused.rows_and_weights(
        student, teacher, local.get("labels"), local.get("row_mask"),
        local.get("vocab_mask"), plan,
    )  # fmt: skip
    reduction = settings.options.reduction
    return reduce_loss(loss, weight, reduction, layout.batch_names).astype(loss.dtype)

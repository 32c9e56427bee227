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
import math

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.checks.mesh_axes import AxisName, check_tokens_divide, mesh_axes
from jaxsoftmax.core.reduction import reduce_loss
from jaxsoftmax.losses import linear_distillation as fused
from jaxsoftmax.tiles.mesh import on_explicit_axes, pad_axis, run_on_mesh, spec_entry


def sharded_linear_distillation_loss(
    student_hidden: jax.typing.ArrayLike,
    student_classifier: jax.typing.ArrayLike,
    teacher_hidden: jax.typing.ArrayLike,
    teacher_classifier: jax.typing.ArrayLike,
    *,
    mesh: Mesh,
    class_axis_name: AxisName,
    batch_axis_name: AxisName | None = None,
    labels: jax.typing.ArrayLike | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    hard_weight: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    vocab_mask: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    student_bias: jax.typing.ArrayLike | None = None,
    teacher_bias: jax.typing.ArrayLike | None = None,
    classifier_layout: str = "vd",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    checked: bool = False,
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
    call = fused.validated(
        student_hidden,
        student_classifier,
        teacher_hidden,
        teacher_classifier,
        labels=labels,
        divergence=divergence,
        temperature=temperature,
        beta=beta,
        hard_weight=hard_weight,
        where=where,
        ignore_index=ignore_index,
        vocab_mask=vocab_mask,
        reduction=reduction,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        classifier_layout=classifier_layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        checked=checked,
    )
    check_tokens_divide(call.student.hidden.shape[0], mesh, batch_names, batch_axis_name,
                        "the hidden states' leading axes, flattened")  # fmt: skip
    given = (student_hidden, student_classifier, teacher_hidden, teacher_classifier, labels,
             where, vocab_mask, student_bias, teacher_bias)  # fmt: skip
    explicit = on_explicit_axes(mesh, given)
    arrays = (call.student, call.teacher, call.labels, call.row_mask, call.vocab_mask)
    settings = call._replace(
        student=None, teacher=None, labels=None, row_mask=None, vocab_mask=None
    )
    out = _sharded_loss(
        *arrays,
        settings=settings,
        mesh=mesh,
        class_names=class_names,
        batch_names=batch_names,
        explicit=explicit,
    )
    if call.reduction == "none":
        out = out.reshape(call.batch)
    return out.astype(call.student.hidden.dtype)


@functools.partial(
    jax.jit, static_argnames=("settings", "mesh", "class_names", "batch_names", "explicit")
)
def _sharded_loss(
    student, teacher, labels, row_mask, vocab_mask, *, settings, mesh, class_names,
    batch_names, explicit,
):  # fmt: skip
    """The loss after validation, compiled once per mesh, settings and shapes."""
    num_class_shards = math.prod(mesh.shape[n] for n in class_names)
    num_local = -(-settings.num_classes // num_class_shards)
    padding = num_local * num_class_shards - settings.num_classes
    vocab_axis = 0 if settings.layout == "vd" else 1
    batch, classes = spec_entry(batch_names), spec_entry(class_names)
    rows = P(batch)
    pad = functools.partial(pad_axis, padding=padding, mesh=mesh if explicit else None)
    classifier_spec = P(classes, None) if settings.layout == "vd" else P(None, classes)

    arrays = {}
    for name, model in (("student", student), ("teacher", teacher)):
        arrays[f"{name}_hidden"] = (model.hidden, P(batch, None))
        classifier = pad(model.classifier, axis=vocab_axis, spec=classifier_spec)
        arrays[f"{name}_classifier"] = (classifier, classifier_spec)
        if model.bias is not None:
            arrays[f"{name}_bias"] = (pad(model.bias, axis=0, spec=P(classes)), P(classes))
    if labels is not None:
        arrays["labels"] = (labels, rows)
    if row_mask is not None:
        arrays["row_mask"] = (row_mask, rows)
    if vocab_mask is not None:  # global on every shard
        arrays["vocab_mask"] = (pad(vocab_mask, axis=0, spec=P(), value=False), P())
    names = list(arrays)
    specs = tuple(spec for _, spec in arrays.values())

    def local_loss(*local):
        got = dict(zip(names, local))
        model = lambda name: LinearHead(
            got[f"{name}_hidden"], got[f"{name}_classifier"], got.get(f"{name}_bias")
        )
        call = settings._replace(
            student=model("student"),
            teacher=model("teacher"),
            labels=got.get("labels"),
            row_mask=got.get("row_mask"),
            vocab_mask=got.get("vocab_mask"),
        )
        num_tokens = got["student_hidden"].shape[0]
        plan = fused.make_plan(call, num_tokens, num_local, axis_name=classes)
        loss, weight = fused.rows_and_weights(call, plan)
        return reduce_loss(loss, weight, call.reduction, batch_names).astype(loss.dtype)

    out_spec = rows if settings.reduction == "none" else P()
    placed = [x for x, _ in arrays.values()]
    return run_on_mesh(local_loss, mesh, placed, specs, out_spec, explicit=explicit)

"""``sharded_linear_token_log_probs``: the fused token log-probabilities, vocabulary split.

:func:`jaxsoftmax.linear_token_log_probs` with the classifier split by vocabulary over a mesh
axis (and the tokens over another), as :func:`jaxsoftmax.sharded_linear_cross_entropy` splits
the fused loss: each device runs the tiles over its own classes and the devices combine the
per-row statistics only (the running maxima, the sums of exponentials, the label logits and
the entropy's running sums), so no ``[N, V]`` array exists on any device. The hidden states'
gradient is the sum over the vocabulary shards of each shard's ``G W_shard``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsoftmax.checks.arrays import check_flag
from jaxsoftmax.checks.linear_call import LinearCall
from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.checks.mesh_axes import AxisName, check_tokens_divide, mesh_axes
from jaxsoftmax.losses.linear_token_log_probs import checked_token_call
from jaxsoftmax.tiles import cross_entropy as fused
from jaxsoftmax.tiles import token_tangents
from jaxsoftmax.tiles.mesh import (
    MeshLayout,
    head_inputs,
    local_head,
    on_explicit_axes,
    run_sharded,
    vocabulary_split,
)


def sharded_linear_token_log_probs(
    hidden: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike,
    *,
    mesh: Mesh,
    class_axis_name: AxisName,
    batch_axis_name: AxisName | None = None,
    temperature: float = 1.0,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    classifier_layout: str = "vd",
    return_entropy: bool = False,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    batch_invariant: bool = False,
    forward_mode: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r""":func:`~jaxsoftmax.linear_token_log_probs` with the classifier split by vocabulary.

    ``classifier`` ``[V, d]`` is split by rows over ``class_axis_name`` (``[d, V]`` with
    ``classifier_layout="dv"``: by columns), ``bias`` likewise, and with ``batch_axis_name``
    the tokens over it (their number must divide by its size; in batch-invariant mode they
    are padded to a multiple of the tile times that size). The values and gradients equal the
    single-device function's; the classifier's gradient comes back split like it.

    Args:
      hidden, classifier, tokens, temperature, bias, where, classifier_layout,
        return_entropy, token_chunk, vocab_chunk, batch_invariant, forward_mode: as in
        :func:`~jaxsoftmax.linear_token_log_probs`; the chunks tile each device's share.
      mesh: the ``jax.sharding.Mesh``.
      class_axis_name: the mesh axis (or axes) the vocabulary is split over.
      batch_axis_name: the mesh axis (or axes) the tokens are split over, or None.

    Returns:
      ``log p`` of shape ``hidden.shape[:-1]`` in float32 (and with ``return_entropy`` the
      pair ``(log p, H)``).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxsoftmax
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
      >>> h = jax.random.normal(jax.random.key(0), (6, 4))
      >>> W = jax.random.normal(jax.random.key(1), (10, 4))
      >>> y = jnp.array([0, 3, 9, 2, 2, 7])
      >>> log_p = sharded_linear_token_log_probs(h, W, y, mesh=mesh, class_axis_name="vocab")
      >>> print(bool(jnp.allclose(log_p, jaxsoftmax.linear_token_log_probs(h, W, y))))
      True
    """
    class_names, batch_names = mesh_axes(mesh, class_axis_name, batch_axis_name)
    batch_shards = 1
    for name in batch_names:
        batch_shards *= mesh.shape[name]
    call, positions, num_tokens = checked_token_call(
        hidden, classifier, tokens, temperature=temperature, bias=bias, where=where,
        classifier_layout=classifier_layout, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
        batch_invariant=batch_invariant, row_multiple=batch_shards,
    )  # fmt: skip
    check_tokens_divide(call.head.hidden.shape[0], mesh, batch_names, batch_axis_name,
                        "hidden's leading axes, flattened")  # fmt: skip
    inputs = (call.head, call.labels, call.row_mask)
    layout = MeshLayout(mesh, class_names, batch_names, on_explicit_axes(mesh, inputs))
    settings = call._replace(head=None, labels=None, row_mask=None)
    entropy_too = check_flag(return_entropy, "return_entropy")
    forward_mode = check_flag(forward_mode, "forward_mode")
    log_p, entropy = _sharded(call.head, call.labels, call.row_mask, settings=settings,
                              layout=layout, entropy=entropy_too,
                              forward_mode=forward_mode)  # fmt: skip
    log_p = log_p[:num_tokens].reshape(positions)
    return (log_p, entropy[:num_tokens].reshape(positions)) if entropy_too else log_p


@functools.partial(jax.jit, static_argnames=("settings", "layout", "entropy", "forward_mode"))
def _sharded(head: LinearHead, tokens, row_mask, *, settings: LinearCall, layout: MeshLayout,
             entropy: bool, forward_mode: bool = False):  # fmt: skip
    """``(log p, H)`` per token after the checks (``H`` 0 and not computed without
    ``entropy``), one compiled program per mesh and shapes."""
    num_local, padding = vocabulary_split(settings.num_classes, layout)
    rows = P(layout.batch)
    inputs = {
        **head_inputs(head, layout, settings.tiles.layout, padding),
        "tokens": (tokens, rows),
        "row_mask": (row_mask, rows),
    }
    local = functools.partial(_local, settings=settings, layout=layout, num_local=num_local,
                              entropy=entropy, forward_mode=forward_mode)  # fmt: skip
    return run_sharded(local, layout, inputs, (rows, rows))


def _local(local: dict, *, settings: LinearCall, layout: MeshLayout, num_local: int,
           entropy: bool, forward_mode: bool):  # fmt: skip
    """One device's rows: minus the fused loss over its classes, and the entropy (zeros, not
    computed, without ``entropy``); with ``forward_mode`` through
    :func:`~jaxsoftmax.tiles.token_tangents.forward_mode_rows`."""
    head = local_head(local)
    plan = fused.make_plan(settings, head.hidden.shape, num_local, axis_name=layout.classes,
                           companions=entropy)  # fmt: skip
    if forward_mode:
        log_p, entropy_rows = token_tangents.forward_mode_rows(
            *head, local["tokens"], local.get("row_mask"), plan
        )
        return log_p, (entropy_rows if entropy else jnp.zeros_like(log_p))
    loss, _, *aux = fused.rows_and_weights(
        head, local["tokens"], None, local.get("row_mask"), None, plan
    )
    return -loss, (aux[0].entropy if aux else jnp.zeros_like(loss))

"""Which training rows each step uses, and batches placed on the mesh.

The batch of step ``s`` is slice ``s mod E`` of the permutation drawn from
``fold_in(fold_in(key(seed), 1), s // E)``, with ``E`` batches per epoch: it depends on the seed
and the step alone, so every process computes the same rows, and nothing depends on how the
steps were split between compiled runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxsoftmax.training.config import TrainConfig
from jaxsoftmax.training.devices import own_range, place_rows, split_along
from jaxsoftmax.training.state import RUN_ONCE_COMPILER_OPTIONS


def is_full_batch(config: TrainConfig, num_examples: int) -> bool:
    """Whether every step uses all ``num_examples`` training rows (no ``batch_size``, or one at
    least that large)."""
    return config.batch_size is None or config.batch_size >= num_examples


def epoch_permutation(seed: int, num_examples: int, epoch: jax.Array) -> jax.Array:
    """The order of the training rows in epoch ``epoch``: the permutation drawn from
    ``fold_in(fold_in(key(seed), 1), epoch)``."""
    data_key = jax.random.fold_in(jax.random.key(seed), 1)
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)


def batch_indices(config: TrainConfig, num_examples: int, step: jax.Array) -> jax.Array | None:
    """The training rows of step ``step``, or ``None`` for full batch.

    Epoch ``e = step // E`` (``E = num_examples // batch_size`` batches, the remainder of each
    permutation is dropped) shuffles with :func:`epoch_permutation`; the step takes slice
    ``step mod E`` of that permutation.
    """
    if is_full_batch(config, num_examples):
        return None
    batches_per_epoch = num_examples // config.batch_size
    permutation = epoch_permutation(config.seed, num_examples, step // batches_per_epoch)
    start = (step % batches_per_epoch) * config.batch_size
    return jax.lax.dynamic_slice(permutation, (start,), (config.batch_size,))


def pad_rows(rows: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array | None]:
    """``rows`` padded with row 0 to a multiple of ``multiple``, and the mask of the real ones
    (``None`` when nothing was padded)."""
    extra = -rows.shape[0] % multiple
    if not extra:
        return rows, None
    mask = jnp.arange(rows.shape[0] + extra) < rows.shape[0]
    return jnp.concatenate([rows, jnp.zeros((extra,), rows.dtype)]), mask


def shard_full_batch(
    x: np.ndarray, y: np.ndarray, mesh: Mesh
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``x, y`` padded to a multiple of the mesh size and split along their rows, and the mask
    of the real rows (``None`` when no padding was needed): the arguments of a full-batch run.
    Each process places only its own rows (:func:`place_rows`)."""
    x, y = np.asarray(x), np.asarray(y)
    extra = -x.shape[0] % mesh.size
    where = None
    if extra:
        where = np.arange(x.shape[0] + extra) < x.shape[0]
        x = np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros((extra, *y.shape[1:]), y.dtype)])
    return (
        place_rows(x, mesh),
        place_rows(y, mesh),
        None if where is None else place_rows(where, mesh),
    )


def process_minibatches(
    config: TrainConfig, x: np.ndarray, y: np.ndarray, mesh: Mesh, first_step: int, num_steps: int
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The minibatches of steps ``first_step ... first_step + num_steps - 1`` as global arrays
    ``[num_steps, B, ...]`` split along ``B`` over the mesh, and the mask of their real rows
    (``None`` when ``batch_size`` divides by the mesh size): the arguments of
    :func:`make_run_of_batches`, for several processes.

    Every process computes the rows of every step (those of :func:`batch_indices`, from the
    seed and the step alone), pads each batch with row 0 to a multiple of the mesh size, gathers
    on the host only the rows its own devices hold and places them (:func:`place_rows`).
    """
    rows = _rows_of_steps(config, len(y), first_step, num_steps)  # [num_steps, batch_size]
    extra = -rows.shape[1] % mesh.size
    where = None
    if extra:
        real = np.arange(rows.shape[1] + extra) < rows.shape[1]
        where = np.broadcast_to(real, (num_steps, len(real)))
        rows = np.concatenate([rows, np.zeros((num_steps, extra), rows.dtype)], axis=1)
    # Only this process's columns of ``rows`` are gathered: the others' rows stay on the host
    # of the process that needs them.
    x_rows, y_rows = _gathered_on_process(x, rows, mesh), _gathered_on_process(y, rows, mesh)
    return x_rows, y_rows, None if where is None else place_rows(np.array(where), mesh, axis=1)


def _gathered_on_process(source: np.ndarray, rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """``source[rows]`` (``rows`` ``[S, B]``) split along ``B``, gathering only this process's
    part of ``B`` on the host."""
    source = np.asarray(source)
    shape = (*rows.shape, *source.shape[1:])
    sharding = split_along(mesh, len(shape), 1)
    own = own_range(sharding, shape, 1)
    return jax.make_array_from_process_local_data(sharding, source[rows[:, own]], shape)


# Runs once per epoch: compiled fast (the values are integers, the same at any optimization).
_epoch_permutation_compiled = jax.jit(
    epoch_permutation, static_argnums=(0, 1), compiler_options=RUN_ONCE_COMPILER_OPTIONS
)


def _rows_of_steps(
    config: TrainConfig, num_examples: int, first_step: int, num_steps: int
) -> np.ndarray:
    """:func:`batch_indices` of steps ``first_step ... first_step + num_steps - 1`` as a host
    array ``[num_steps, batch_size]``: one permutation per epoch, on this process's device,
    sliced on the host."""
    batches_per_epoch = num_examples // config.batch_size
    permutations = {}
    rows = []
    for step in range(first_step, first_step + num_steps):
        epoch, batch = divmod(step, batches_per_epoch)
        if epoch not in permutations:
            permutations[epoch] = np.asarray(
                _epoch_permutation_compiled(config.seed, num_examples, epoch)
            )
        rows.append(
            permutations[epoch][batch * config.batch_size : (batch + 1) * config.batch_size]
        )
    return np.stack(rows)

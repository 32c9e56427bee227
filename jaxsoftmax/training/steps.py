"""The compiled programs of a run: one optimizer step, a run of steps in one ``lax.scan``, and
the evaluation of a whole split.

- :func:`make_train_step`: one optimizer step on one batch, ``(state, x, y) -> (state, loss)``.
  It knows nothing about where the batch came from, so a sharded batch can be fed to it.
- :func:`make_run_of_steps`: ``num_steps`` steps fused into one ``lax.scan`` and compiled once,
  choosing each step's batch from ``(seed, step)`` alone, so 10,000 steps are 100 dispatches of a
  100-step program, not 10,000 Python calls.
- :func:`make_run_of_batches`: the same over batches placed by the caller (several processes).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsoftmax import mlp
from jaxsoftmax.data import Dataset
from jaxsoftmax.training.batches import batch_indices, pad_rows
from jaxsoftmax.training.config import TrainConfig
from jaxsoftmax.training.devices import BATCH_AXIS
from jaxsoftmax.training.state import TrainState


def check_config_for_dataset(config: TrainConfig, dataset: Dataset) -> None:
    """Raises ``ValueError`` (or ``TypeError``) naming the setting if ``config`` cannot train on
    ``dataset``, before anything is computed or compiled.

    ``class_weights`` must hold one weight per class of ``dataset``; every other loss option
    goes through the loss's own checks, which look at shapes and Python values only, by tracing
    :func:`jaxsoftmax.mlp.loss` abstractly (``jax.eval_shape``: no arithmetic). :func:`train`
    calls it first; a script calls it to report a bad flag as a usage error.
    """
    if config.class_weights is not None and len(config.class_weights) != dataset.num_classes:
        raise ValueError(
            f"class_weights={config.class_weights} holds {len(config.class_weights)} weight(s) "
            f"but dataset {dataset.name!r} has {dataset.num_classes} classes; expected one "
            "weight per class."
        )
    sizes = [dataset.num_features, *config.hidden, dataset.num_classes]
    params = jax.eval_shape(
        lambda: mlp.init(
            jax.random.key(0), sizes, scheme=config.init_scheme, scale=config.init_scale
        )
    )
    options = config.loss_options()
    jax.eval_shape(
        lambda p: mlp.loss(p, dataset.x_train[:1], dataset.y_train[:1], **options), params
    )


def make_train_step(
    config: TrainConfig, optimizer: optax.GradientTransformation
) -> Callable[..., tuple[TrainState, jax.Array]]:
    """One optimizer step on the batch it is given: ``(state, x, y, where=None) -> (state, loss)``.

    ``loss`` is the objective of :func:`jaxsoftmax.mlp.loss` on the batch *before* the update;
    ``where`` (bool ``[N]``) leaves padding rows out of it.
    """
    options = config.loss_options()

    def train_step(
        state: TrainState, x: jax.Array, y: jax.Array, where: jax.Array | None = None
    ) -> tuple[TrainState, jax.Array]:
        loss_value, grads = jax.value_and_grad(mlp.loss)(state.params, x, y, where=where, **options)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), loss_value

    return train_step


def make_run_of_steps(
    config: TrainConfig, optimizer: optax.GradientTransformation, mesh: Mesh | None = None
) -> Callable[..., tuple[TrainState, jax.Array]]:
    """A jitted ``(state, x_train, y_train, num_steps, where=None) -> (state, losses[num_steps])``.

    The steps run inside one ``lax.scan``; ``num_steps`` is static, so each distinct length
    compiles once. With a ``mesh`` (from :func:`make_mesh`) every step's batch is split across
    its ``"batch"`` axis and the returned state and losses are replicated; the state passed in
    should be replicated on the mesh too (``jax.device_put(state, NamedSharding(mesh, P()))``).

    ``where`` given means ``x_train, y_train`` are a full batch padded by
    :func:`shard_full_batch`, ``where`` marking the real rows; every step then uses all of them.
    Otherwise each step gathers the rows of :func:`batch_indices` (all rows for a full batch),
    padded with masked rows to a multiple of the mesh size.
    """
    train_step = make_train_step(config, optimizer)
    num_shards = 1 if mesh is None else mesh.size

    def split_rows(*arrays):
        if mesh is None:
            return arrays
        batch = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
        return tuple(
            None if a is None else jax.lax.with_sharding_constraint(a, batch) for a in arrays
        )

    def run(state: TrainState, x: jax.Array, y: jax.Array, num_steps: int, where=None):
        def body(carry: TrainState, _):
            rows = None if where is not None else batch_indices(config, x.shape[0], carry.step)
            if rows is None:
                if where is None and x.shape[0] % num_shards:
                    rows = jnp.arange(x.shape[0])  # an unpadded full batch: pad it here
                else:
                    return train_step(carry, *split_rows(x, y, where))
            rows, mask = pad_rows(rows, num_shards)
            return train_step(carry, *split_rows(x[rows], y[rows], mask))

        return jax.lax.scan(body, state, None, length=num_steps)

    out_shardings = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return jax.jit(run, static_argnums=3, out_shardings=out_shardings)


def make_run_of_batches(
    config: TrainConfig, optimizer: optax.GradientTransformation, mesh: Mesh
) -> Callable[..., tuple[TrainState, jax.Array]]:
    """A jitted ``(state, x_steps, y_steps, where=None) -> (state, losses[num_steps])``: one step
    on each of the given batches ``x_steps[s], y_steps[s]`` (from :func:`process_minibatches`,
    split along their rows over ``mesh``), in one ``lax.scan``. The state passed in should be
    replicated on the mesh; the returned state and losses are."""
    train_step = make_train_step(config, optimizer)

    def run(state: TrainState, x_steps, y_steps, where=None):
        return jax.lax.scan(
            lambda carry, batch: train_step(carry, *batch), state, (x_steps, y_steps, where)
        )

    return jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec()))


def make_evaluate(config: TrainConfig) -> Callable[..., dict]:
    """A jitted ``(params, x, y, where=None) -> {"loss", "accuracy"}`` on a whole split;
    ``where`` (bool ``[N]``) leaves padding rows out of both."""
    options = config.loss_options()

    def evaluate(params, x, y, where=None):
        if where is None:
            accuracy = mlp.accuracy(params, x, y, config.activation)
        else:
            correct = (mlp.predict(params, x, config.activation) == y) & where
            accuracy = jnp.sum(correct) / jnp.sum(where)
        return {"loss": mlp.loss(params, x, y, where=where, **options), "accuracy": accuracy}

    return jax.jit(evaluate)

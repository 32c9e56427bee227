"""Training the network of :mod:`jaxsoftmax.mlp` with an optax optimizer, in compiled runs of steps.

The loop has three layers, each usable on its own:

- :func:`make_train_step`: one optimizer step on one batch, ``(state, x, y) -> (state, loss)``.
  It knows nothing about where the batch came from, so a sharded batch can be fed to it.
- :func:`make_run_of_steps`: ``num_steps`` steps fused into one ``lax.scan`` and compiled once,
  choosing each step's batch from ``(seed, step)`` alone, so 10,000 steps are 100 dispatches of a
  100-step program, not 10,000 Python calls.
- :func:`train`: runs of ``eval_every`` steps, an evaluation on both splits after each, atomic
  checkpoints every ``checkpoint_every`` steps, ``resume``, and a stop on a non-finite loss,
  parameter or optimizer state (which is then never checkpointed).

Data parallelism: :func:`train` runs on ``config.devices`` local devices (all of them by default)
through JAX's SPMD partitioner. A one-axis :class:`jax.sharding.Mesh` named ``"batch"`` spans
them; parameters and optimizer state are replicated (``PartitionSpec()``), each step's batch is
split along its rows (``PartitionSpec("batch")``), and ``jit`` compiles the *same global program*
as on one device, with an all-reduce where the per-device gradient sums meet. The loss is still
the mean over the whole batch, so the result equals one device's up to the order of float
additions. A batch whose size does not divide by the device count is padded with masked rows
(``mlp.loss(..., where=...)``), which count neither in the mean nor in the gradient. For a full
batch the padded training split is placed sharded once; for minibatches the split is copied to
every device and each step's gathered rows are split across them.

Several processes (``jax.distributed``, one per host of a GPU cluster or TPU pod slice): once
``jax.distributed.initialize`` has run in every process, :func:`train` runs unchanged in each of
them. The ``"batch"`` mesh then spans the first ``config.devices`` local devices of every process,
process 0's first, and each process hands JAX only the rows of each batch that its own devices
hold (``jax.make_array_from_process_local_data``): the full training split for a full batch, each
compiled run's minibatches otherwise (gathered on the host from the step's rows, which every
process computes from ``(seed, step)``), and the evaluation splits, padded and masked. No device
holds a whole split. Parameters and optimizer state are replicated on every device of every
process; the losses and metrics come out of the same all-reduced global program, so every process
sees the same numbers. Process 0 alone writes checkpoints; with ``resume`` every process reads the
checkpoint, so ``checkpoint_dir`` must be a folder all of them see (the processes check that they
found the same step before going on). docs/scaling.md has the commands.

Determinism: parameters come from ``fold_in(key(seed), 0)``; the batch of step ``s`` is slice
``s mod E`` of the permutation drawn from ``fold_in(fold_in(key(seed), 1), s // E)`` with ``E``
batches per epoch. Nothing depends on how the steps were split between runs, or on the number of
devices, so on the CPU the same seed and device count give the same parameters bit for bit, and a
resumed run ends where an uninterrupted one does. Another device count changes only the rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsoftmax import mlp
from jaxsoftmax.data import Dataset

OPTIMIZERS = ("sgd", "momentum", "adam")
CHECKPOINT_FILENAME = "checkpoint.npz"
DEFAULT_CHECKPOINT_EVERY = 1000  # steps, rounded up to a multiple of eval_every
BATCH_AXIS = "batch"
# For programs that run once (the initial state): compiling fast matters more than running fast.
_RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class NonFiniteLossError(FloatingPointError):
    """The training loss, the parameters or the optimizer state became NaN or infinite; the run
    was stopped."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a run. The defaults are CS231n's two-layer spiral case study.

    Attributes:
      hidden: hidden-layer widths; ``()`` is a linear softmax classifier.
      activation: ``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``"identity"``.
      optimizer: ``"sgd"`` (plain gradient descent), ``"momentum"`` (SGD with heavy-ball momentum
        ``momentum``) or ``"adam"``.
      learning_rate: the step size (CS231n: 1.0 for gradient descent).
      momentum: the momentum coefficient of ``optimizer="momentum"``.
      l2: the weight penalty ``0.5 * l2 * sum ||W||^2`` (CS231n's ``reg``, 1e-3).
      steps: the total number of optimizer steps.
      batch_size: examples per step; ``None`` (or at least the training-set size) is full batch.
      seed: the one seed of the run: initialisation and batch order derive from it.
      init_scheme, init_scale: passed to :func:`jaxsoftmax.mlp.init` (CS231n: 0.01 * randn).
      label_smoothing, class_weights, z_loss, logit_softcap: options of the core cross-entropy.
      eval_every: steps per compiled run; the history gets one row per run.
      checkpoint_every: steps between checkpoints, a multiple of ``eval_every``; ``None`` (the
        default) is every 1000 steps rounded up to a multiple of ``eval_every`` (1000 for the
        default ``eval_every=100``), and the config holds that number.
      devices: train data-parallel on the first ``devices`` local devices; ``None`` uses all of
        them (one on an ordinary CPU). With several processes (``jax.distributed``), the first
        ``devices`` of each process. Not a hyperparameter: any count gives the same run up to
        float rounding, so a checkpoint may be resumed on another count (or process count).
    """

    hidden: tuple[int, ...] = (100,)
    activation: str = "relu"
    optimizer: str = "sgd"
    learning_rate: float = 1.0
    momentum: float = 0.9
    l2: float = 1e-3
    steps: int = 10_000
    batch_size: int | None = None
    seed: int = 0
    init_scheme: str = "normal"
    init_scale: float = 0.01
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    z_loss: float = 0.0
    logit_softcap: float | None = None
    eval_every: int = 100
    checkpoint_every: int | None = None
    devices: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        if any(h <= 0 for h in self.hidden):
            raise ValueError(
                f"hidden={self.hidden} must hold positive widths; use hidden=() for a linear "
                "softmax classifier."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={self.optimizer!r} is not known; expected one of {', '.join(OPTIMIZERS)}."
            )
        mlp._activation_function(self.activation)
        for name in ("steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.checkpoint_every is None:
            runs = -(-DEFAULT_CHECKPOINT_EVERY // self.eval_every)
            object.__setattr__(self, "checkpoint_every", runs * self.eval_every)
        if self.devices is not None and self.devices <= 0:
            raise ValueError(
                f"devices={self.devices} must be a positive number of devices, or None for all "
                "local devices."
            )
        if self.batch_size is not None and self.batch_size <= 0:
            raise ValueError(
                f"batch_size={self.batch_size} must be positive, or None for full batch."
            )
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                f"eval_every={self.eval_every} (checkpoints are written between compiled runs)."
            )

    def loss_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxsoftmax.mlp.loss` this config fixes."""
        return {
            "l2": self.l2,
            "activation": self.activation,
            "label_smoothing": self.label_smoothing,
            "class_weights": None
            if self.class_weights is None
            else jnp.asarray(self.class_weights),
            "z_loss": self.z_loss,
            "logit_softcap": self.logit_softcap,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


class TrainState(NamedTuple):
    """What changes from step to step: a pytree, so it can be the carry of ``lax.scan``."""

    params: mlp.Params
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: the number of steps taken


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      params: the final parameters.
      history: one dict per compiled run (and one for step 0): ``step``, ``batch_loss`` (mean of
        the run's per-step minibatch objectives), ``train_loss``, ``train_accuracy``,
        ``test_loss``, ``test_accuracy`` (losses include the L2 term).
      final_loss: the objective on the whole training split at the final parameters.
      train_accuracy, test_accuracy: at the final parameters.
      steps: the number of steps taken in total.
      train_seconds: wall time of this call, compilation included.
      resumed_from: the step of the checkpoint this call continued from, or ``None``.
      devices: the number of devices the steps ran on, data-parallel (of every process).
      processes: the number of processes they belong to (``jax.process_count()``).
    """

    params: mlp.Params
    history: list[dict[str, float]]
    final_loss: float
    train_accuracy: float
    test_accuracy: float
    steps: int
    train_seconds: float
    resumed_from: int | None
    devices: int
    processes: int = 1


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``optax.sgd`` (with ``momentum`` for ``"momentum"``) or ``optax.adam`` at ``learning_rate``."""
    if config.optimizer == "sgd":
        return optax.sgd(config.learning_rate)
    if config.optimizer == "momentum":
        return optax.sgd(config.learning_rate, momentum=config.momentum)
    return optax.adam(config.learning_rate)


def _initial_params(
    seed_key: jax.Array, sizes: tuple[int, ...], scheme: str, scale: float
) -> mlp.Params:
    """``mlp.init`` from ``fold_in(seed_key, 0)``."""
    return mlp.init(jax.random.fold_in(seed_key, 0), sizes, scheme=scheme, scale=scale)


# Run eagerly, each ``jax.random`` operation compiles a program of its own (1.4 s on the 2-core
# CPU for the spiral's network, longer than compiling the training run); compiled whole with
# XLA's optimizations, the random-number code takes 1.0 s to compile for a program that runs
# once in a millisecond. Unoptimized it compiles in about 0.4 s. The values equal the eager ones
# up to the last bit of some weights, the same on every run.
_initial_params_compiled_once = jax.jit(
    _initial_params, static_argnums=(1, 2, 3), compiler_options=_RUN_ONCE_COMPILER_OPTIONS
)


def init_state(
    config: TrainConfig, num_features: int, num_classes: int
) -> tuple[TrainState, optax.GradientTransformation]:
    """Fresh parameters from ``fold_in(key(seed), 0)``, the optimizer and its initial state.

    Called inside a trace (``jit``, ``eval_shape``), the draw becomes part of the caller's
    program instead of a program compiled on its own.
    """
    sizes = (num_features, *config.hidden, num_classes)
    seed_key = jax.random.key(config.seed)
    # Compiler options are for top-level programs only: traced, the draw joins the caller's.
    draw = (
        _initial_params if isinstance(seed_key, jax.core.Tracer) else _initial_params_compiled_once
    )
    params = draw(seed_key, sizes, config.init_scheme, config.init_scale)
    optimizer = make_optimizer(config)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32)), optimizer


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


def select_devices(count: int | None, *, name: str = "devices") -> list[jax.Device]:
    """The first ``count`` local devices, or all of them for ``None``.

    ``name`` is how the caller spells the setting in the error (``"--devices"`` for a script).
    """
    available = jax.local_devices()
    if count is None:
        return available
    if count < 1:
        raise ValueError(f"{name}={count} must be at least 1 (or unset, for all local devices).")
    if count > len(available):
        raise ValueError(
            f"{name}={count} asks for more devices than this process has: {len(available)} local "
            f"{available[0].platform} device(s). Ask for at most {len(available)}, or leave it "
            "unset to use all; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N set "
            "before JAX starts gives N virtual devices."
        )
    return available[:count]


def make_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh named ``"batch"`` over :func:`select_devices` ``(devices)``.

    With several processes it spans the first ``devices`` local devices of every process (all
    of them for ``None``), process 0's first: each process's devices then hold one contiguous
    range of the rows of a batch (:func:`place_rows`).
    """
    local = select_devices(devices)
    if jax.process_count() == 1:
        return Mesh(np.array(local), (BATCH_AXIS,))
    counts = [len(jax.local_devices(process_index=p)) for p in range(jax.process_count())]
    if devices is None and len(set(counts)) > 1:
        raise ValueError(
            f"devices=None uses all local devices, but the processes have different numbers of "
            f"them ({counts}, by process); expected the same number in every process. Set "
            f"devices to at most {min(counts)}."
        )
    chosen = [
        device
        for process in range(jax.process_count())
        for device in jax.local_devices(process_index=process)[: len(local)]
    ]
    return Mesh(np.array(chosen), (BATCH_AXIS,))


def place_rows(array: np.ndarray, mesh: Mesh, *, axis: int = 0) -> jax.Array:
    """``array`` split along ``axis`` over the mesh's ``"batch"`` axis (its other axes whole).

    Every process passes the same host array; each hands JAX only the slice its own devices
    hold (``jax.make_array_from_process_local_data``), so no process places another's rows.
    With one process that is the whole array, as ``jax.device_put`` would place it.
    ``array.shape[axis]`` must divide by the mesh size.
    """
    array = np.asarray(array)
    sharding = _split_along(mesh, array.ndim, axis)
    own = [slice(None)] * array.ndim
    own[axis] = _own_range(sharding, array.shape, axis)
    return jax.make_array_from_process_local_data(sharding, array[tuple(own)], array.shape)


def _split_along(mesh: Mesh, ndim: int, axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[axis] = BATCH_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def _own_range(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> slice:
    """The indices along ``axis`` that this process's devices hold of an array of ``shape``
    split by ``sharding``: one range, since :func:`make_mesh` orders the devices by process."""
    held = [index[axis] for index in sharding.addressable_devices_indices_map(shape).values()]
    start = min(part.start or 0 for part in held)
    stop = max(shape[axis] if part.stop is None else part.stop for part in held)
    return slice(start, stop)


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


def _pad_rows(rows: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array | None]:
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
    sharding = _split_along(mesh, len(shape), 1)
    own = _own_range(sharding, shape, 1)
    return jax.make_array_from_process_local_data(sharding, source[rows[:, own]], shape)


# Runs once per epoch: compiled fast (the values are integers, the same at any optimization).
_epoch_permutation_compiled = jax.jit(
    epoch_permutation, static_argnums=(0, 1), compiler_options=_RUN_ONCE_COMPILER_OPTIONS
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
            rows, mask = _pad_rows(rows, num_shards)
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


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _dataset_fingerprint(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for array in (dataset.x_train, dataset.y_train):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _temporary_prefix(path: str) -> str:
    """``dir/checkpoint.npz`` -> ``.checkpoint-``: the temporaries of ``path`` are
    ``dir/.checkpoint-*.tmp``."""
    return "." + os.path.splitext(os.path.basename(path))[0] + "-"


def write_atomically(path: str, payload: bytes | str) -> None:
    """Writes ``payload`` (``str`` as UTF-8) to ``path`` so that a reader, or a crash, sees the
    old file or the new one, never a partial one.

    The bytes go to a temporary file beside ``path`` (``.NAME-*.tmp`` for ``NAME.ext``), which
    is synced and then renamed over ``path``. If writing fails the temporary is removed and
    ``path`` is untouched; only a process killed mid-write leaves one behind, for
    :func:`remove_stale_temporaries`. Checkpoints, ``metrics.json`` and ``history.csv`` of
    ``experiments/train.py`` and the table of ``experiments/gradient_check.py`` are written so.
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(
        dir=directory, prefix=_temporary_prefix(path), suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def remove_stale_temporaries(path: str) -> list[str]:
    """Deletes the temporaries that :func:`write_atomically` ``(path, ...)`` left when its process
    was killed mid-write, and returns their paths. Call it before a run writes ``path``, not
    while another process may be writing it."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temporary_prefix(path)
    if not os.path.isdir(directory):
        return []
    stale = [
        os.path.join(directory, name)
        for name in sorted(os.listdir(directory))
        if name.startswith(prefix) and name.endswith(".tmp")
    ]
    for temporary in stale:
        os.unlink(temporary)
    return stale


def save_checkpoint(
    path: str, state: TrainState, history: list[dict], config: TrainConfig, dataset: Dataset
) -> None:
    """Parameters, optimizer state, step, data key, history and config, as one ``.npz``."""
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["step"] = np.asarray(state.step)
    arrays["data_key"] = np.asarray(jax.random.key_data(data_key))
    arrays["history"] = np.asarray(json.dumps(history))
    arrays["config"] = np.asarray(json.dumps(config.to_dict()))
    arrays["dataset"] = np.asarray(json.dumps([dataset.name, _dataset_fingerprint(dataset)]))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())


def check_checkpoint(path: str, config: TrainConfig, dataset: Dataset) -> int:
    """Raises the ``ValueError`` that :func:`load_checkpoint` or :func:`train` would raise for
    resuming the checkpoint at ``path`` with ``config`` on ``dataset``, without loading its
    arrays or compiling anything; returns the checkpoint's step. A script calls it to report a
    mismatch before any work."""
    try:
        with open(path, "rb") as file:  # closed whatever np.load makes of it
            archive = np.load(file, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with archive:
                stored = {key: archive[key] for key in ("config", "dataset", "step")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"the checkpoint {path} cannot be read ({type(error).__name__}: {error}); delete it "
            "to start from scratch, or use another output directory."
        ) from None
    _check_stored_checkpoint(stored, path, config, dataset)
    step = int(stored["step"])
    if step > config.steps:
        raise ValueError(
            f"the checkpoint is at step {step}, beyond steps={config.steps}; "
            "ask for at least as many steps as were already taken."
        )
    return step


def _check_stored_checkpoint(stored, path: str, config: TrainConfig, dataset: Dataset) -> None:
    saved_config = json.loads(str(stored["config"]))
    wanted = config.to_dict()
    different = {
        key: (saved_config.get(key), value)
        for key, value in wanted.items()
        if key not in ("steps", "devices") and saved_config.get(key) != value
    }
    if different:
        raise ValueError(
            f"the checkpoint {path} was written by a different configuration "
            f"(saved, requested): {different}; resume with the same flags or use another "
            "output directory."
        )
    if json.loads(str(stored["dataset"])) != [dataset.name, _dataset_fingerprint(dataset)]:
        raise ValueError(
            f"the checkpoint {path} was trained on other data than dataset "
            f"{dataset.name!r} with these options; resume with the same data."
        )


def load_checkpoint(
    path: str, template: TrainState, config: TrainConfig, dataset: Dataset
) -> tuple[TrainState, list[dict]]:
    """Reads a checkpoint of :func:`save_checkpoint` into the structure of ``template``.

    Refuses a checkpoint of another configuration (``steps`` may differ, to extend a run, and
    ``devices``, which changes only the rounding) or of other training data, since continuing it
    would not be the run that was asked for.
    """
    with np.load(path, allow_pickle=False) as stored:
        _check_stored_checkpoint(stored, path, config, dataset)
        treedef = jax.tree_util.tree_structure((template.params, template.opt_state))
        leaves = [jnp.asarray(stored[f"leaf_{i}"]) for i in range(treedef.num_leaves)]
        params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
        step = jnp.asarray(stored["step"], jnp.int32)
        history = json.loads(str(stored["history"]))
    return TrainState(params, opt_state, step), history


# ---------------------------------------------------------------------------------------------
# The loop


def _all_finite(tree: Any) -> bool:
    return all(
        bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree_util.tree_leaves(tree)
    )


def train(
    config: TrainConfig,
    dataset: Dataset,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    on_run_end: Callable[[dict[str, float], int], None] | None = None,
) -> TrainResult:
    """Trains ``mlp`` on ``dataset.x_train`` and evaluates on both splits after every run.

    The steps run data-parallel on ``config.devices`` devices (see the module docstring). Under
    ``jax.distributed`` every process calls it with the same arguments; process 0 alone writes
    the checkpoints, and every process returns the same result.

    Args:
      config: the hyperparameters.
      dataset: from :func:`jaxsoftmax.data.load` (or ``from_arrays``).
      checkpoint_dir: where ``checkpoint.npz`` is written every ``config.checkpoint_every`` steps
        and at the end, atomically (:func:`write_atomically`); temporaries a killed run left
        there are removed first. ``None`` writes nothing. With several processes, a folder
        every process sees.
      resume: continue from ``checkpoint_dir/checkpoint.npz`` if it exists (fresh start if not).
      on_run_end: called as ``on_run_end(history_row, steps_in_run)`` after each compiled run,
        e.g. to advance a progress bar.

    Returns:
      A :class:`TrainResult`.

    Raises:
      NonFiniteLossError: a run produced a NaN or infinite loss, parameter or optimizer state
        (an overflowed moment estimate can leave the loss and parameters finite); the checkpoint
        on disk is the last one with finite values.
      ValueError: ``config.devices`` exceeds the local devices, ``config`` does not fit
        ``dataset`` (:func:`check_config_for_dataset`), a checkpoint does not match, or the
        processes found different checkpoints.
    """
    started = time.perf_counter()
    check_config_for_dataset(config, dataset)
    mesh = make_mesh(config.devices)
    processes = jax.process_count()
    replicated = NamedSharding(mesh, PartitionSpec())
    full_batch = is_full_batch(config, len(dataset.y_train))
    if processes == 1:  # every device holds both splits, for the evaluations
        x_train, y_train, x_test, y_test = jax.device_put(
            (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test), replicated
        )
        train_split, test_split = (x_train, y_train, None), (x_test, y_test, None)
        if full_batch:
            steps_data = shard_full_batch(dataset.x_train, dataset.y_train, mesh)
        else:  # every step gathers its rows from a copy on each device, then splits them
            steps_data = (x_train, y_train, None)
    else:  # each process places only its own rows: of the splits, and of each run's batches
        train_split = steps_data = shard_full_batch(dataset.x_train, dataset.y_train, mesh)
        test_split = shard_full_batch(dataset.x_test, dataset.y_test, mesh)
    state, optimizer = init_state(config, dataset.num_features, dataset.num_classes)
    state = jax.device_put(state, replicated)
    if processes == 1 or full_batch:
        run_of_steps = make_run_of_steps(config, optimizer, mesh)
        x_steps, y_steps, where = steps_data

        def run(state: TrainState, num_steps: int):
            return run_of_steps(state, x_steps, y_steps, num_steps, where)

    else:
        run_of_batches = make_run_of_batches(config, optimizer, mesh)

        def run(state: TrainState, num_steps: int):
            batches = process_minibatches(
                config, dataset.x_train, dataset.y_train, mesh, int(state.step), num_steps
            )
            return run_of_batches(state, *batches)

    evaluate = make_evaluate(config)

    checkpoint_path = None
    writes = jax.process_index() == 0  # the one process that writes the checkpoints
    if checkpoint_dir is not None:
        checkpoint_path = os.path.join(checkpoint_dir, CHECKPOINT_FILENAME)
        if writes:
            os.makedirs(checkpoint_dir, exist_ok=True)
            remove_stale_temporaries(checkpoint_path)  # of a run killed while it saved

    def history_row(state: TrainState, batch_loss: float | None) -> dict[str, Any]:
        on_train = evaluate(state.params, *train_split)
        on_test = evaluate(state.params, *test_split)
        return {
            "step": int(state.step),
            "batch_loss": batch_loss,
            "train_loss": float(on_train["loss"]),
            "train_accuracy": float(on_train["accuracy"]),
            "test_loss": float(on_test["loss"]),
            "test_accuracy": float(on_test["accuracy"]),
        }

    resumed_from = None
    found = resume and checkpoint_path is not None and os.path.exists(checkpoint_path)
    if processes > 1 and resume and checkpoint_path is not None:
        _check_processes_agree(checkpoint_path, found)
    if found:
        state, history = load_checkpoint(checkpoint_path, state, config, dataset)
        state = jax.device_put(state, replicated)
        resumed_from = int(state.step)
        if resumed_from > config.steps:
            raise ValueError(
                f"the checkpoint is at step {resumed_from}, beyond steps={config.steps}; "
                "ask for at least as many steps as were already taken."
            )
    else:
        history = [history_row(state, None)]
    last_checkpoint = resumed_from

    while int(state.step) < config.steps:
        step = int(state.step)
        run_length = min(config.steps, (step // config.eval_every + 1) * config.eval_every) - step
        new_state, losses = run(state, run_length)
        losses = np.asarray(losses)
        non_finite = [
            name
            for name, finite in (
                ("loss", np.all(np.isfinite(losses))),
                ("parameters", _all_finite(new_state.params)),
                ("optimizer state", _all_finite(new_state.opt_state)),
            )
            if not finite
        ]
        if non_finite:
            when = f"between steps {step} and {step + run_length}"
            if "loss" in non_finite:
                when = f"at step {step + int(np.argmin(np.isfinite(losses)))} ({when})"
            kept = (
                f"the last good checkpoint, step {last_checkpoint}, is kept in {checkpoint_path}"
                if last_checkpoint is not None
                else "no checkpoint had been written yet"
            )
            raise NonFiniteLossError(
                f"the training {' and '.join(non_finite)} became non-finite {when}; {kept}. "
                f"Try a smaller learning_rate (was {config.learning_rate}) or a larger l2 "
                f"(was {config.l2})."
            )
        state = new_state
        row = history_row(state, float(np.mean(losses)))
        history.append(row)
        if checkpoint_path is not None and (
            int(state.step) % config.checkpoint_every == 0 or int(state.step) == config.steps
        ):
            if writes:
                save_checkpoint(checkpoint_path, state, history, config, dataset)
            last_checkpoint = int(state.step)
        if on_run_end is not None:
            on_run_end(row, run_length)

    jax.block_until_ready(state.params)
    final = history[-1]
    return TrainResult(
        params=state.params,
        history=history,
        final_loss=final["train_loss"],
        train_accuracy=final["train_accuracy"],
        test_accuracy=final["test_accuracy"],
        steps=int(state.step),
        train_seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
        devices=mesh.size,
        processes=processes,
    )


def _check_processes_agree(checkpoint_path: str, found: bool) -> None:
    """Raises ``ValueError`` on every process unless all of them found the checkpoint at the
    same step, or none found it: a process that started afresh while the others resumed would
    wait for them forever in the first all-reduce."""
    from jax.experimental import multihost_utils

    step = -1
    if found:
        with np.load(checkpoint_path, allow_pickle=False) as stored:
            step = int(stored["step"])
    steps = [int(s) for s in multihost_utils.process_allgather(np.int32(step))]
    if len(set(steps)) > 1:
        seen = ", ".join(
            f"process {p}: " + ("none" if s < 0 else f"step {s}") for p, s in enumerate(steps)
        )
        raise ValueError(
            f"the processes found different checkpoints at {checkpoint_path} ({seen}); expected "
            "the same file in every process. Put the checkpoint folder on a file system that "
            "every process sees, or copy process 0's checkpoint to every host."
        )

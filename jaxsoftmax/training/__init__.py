"""Training the network of :mod:`jaxsoftmax.mlp` with an optax optimizer, in compiled runs of steps.

One module per idea, each usable on its own; this package re-exports their public names:

- :mod:`~jaxsoftmax.training.config`: :class:`TrainConfig`, :class:`TrainResult`,
  :class:`NonFiniteLossError`.
- :mod:`~jaxsoftmax.training.state`: :class:`TrainState`, :func:`make_optimizer`,
  :func:`init_state`.
- :mod:`~jaxsoftmax.training.devices`: :func:`select_devices`, the ``"batch"`` mesh
  (:func:`make_mesh`) and arrays split along it (:func:`place_rows`).
- :mod:`~jaxsoftmax.training.batches`: the rows of each step (:func:`batch_indices`) and batches
  placed on the mesh, by one process or several.
- :mod:`~jaxsoftmax.training.steps`: the compiled programs: :func:`make_train_step`, one optimizer
  step on one batch; :func:`make_run_of_steps`, ``num_steps`` steps fused into one ``lax.scan``
  and compiled once, so 10,000 steps are 100 dispatches of a 100-step program, not 10,000 Python
  calls; :func:`make_evaluate`.
- :mod:`~jaxsoftmax.training.files` (:func:`write_atomically`) and
  :mod:`~jaxsoftmax.training.checkpoints`: atomic files, and the ``.npz`` of a run's state.
- :mod:`~jaxsoftmax.training.loop`: :func:`run_loop`, the one loop of every training here (this
  network's, and the language model's and distillation's in ``experiments/``): runs of steps up to
  each evaluation, a stop on a non-finite loss, parameter or optimizer state (which is then never
  checkpointed), history rows, checkpoints and ``resume``.
- :mod:`~jaxsoftmax.training.mlp_trainer`: :func:`train`, all of it for the network, with
  checkpoints of :mod:`~jaxsoftmax.training.mlp_checkpoints`.

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

from jaxsoftmax.training.batches import batch_indices as batch_indices
from jaxsoftmax.training.batches import epoch_permutation as epoch_permutation
from jaxsoftmax.training.batches import is_full_batch as is_full_batch
from jaxsoftmax.training.batches import process_minibatches as process_minibatches
from jaxsoftmax.training.batches import shard_full_batch as shard_full_batch
from jaxsoftmax.training.checkpoints import CHECKPOINT_FILENAME as CHECKPOINT_FILENAME
from jaxsoftmax.training.checkpoints import prepare_checkpoint as prepare_checkpoint
from jaxsoftmax.training.config import DEFAULT_CHECKPOINT_EVERY as DEFAULT_CHECKPOINT_EVERY
from jaxsoftmax.training.config import OPTIMIZERS as OPTIMIZERS
from jaxsoftmax.training.config import NonFiniteLossError as NonFiniteLossError
from jaxsoftmax.training.config import TrainConfig as TrainConfig
from jaxsoftmax.training.config import TrainResult as TrainResult
from jaxsoftmax.training.devices import BATCH_AXIS as BATCH_AXIS
from jaxsoftmax.training.devices import make_mesh as make_mesh
from jaxsoftmax.training.devices import place_rows as place_rows
from jaxsoftmax.training.devices import select_devices as select_devices
from jaxsoftmax.training.files import remove_stale_temporaries as remove_stale_temporaries
from jaxsoftmax.training.files import write_atomically as write_atomically
from jaxsoftmax.training.loop import all_finite as all_finite
from jaxsoftmax.training.loop import run_loop as run_loop
from jaxsoftmax.training.loop import start_or_resume as start_or_resume
from jaxsoftmax.training.mlp_checkpoints import check_checkpoint as check_checkpoint
from jaxsoftmax.training.mlp_checkpoints import load_checkpoint as load_checkpoint
from jaxsoftmax.training.mlp_checkpoints import save_checkpoint as save_checkpoint
from jaxsoftmax.training.mlp_trainer import train as train
from jaxsoftmax.training.state import RUN_ONCE_COMPILER_OPTIONS as RUN_ONCE_COMPILER_OPTIONS
from jaxsoftmax.training.state import TrainState as TrainState
from jaxsoftmax.training.state import init_state as init_state
from jaxsoftmax.training.state import make_optimizer as make_optimizer
from jaxsoftmax.training.steps import check_config_for_dataset as check_config_for_dataset
from jaxsoftmax.training.steps import make_evaluate as make_evaluate
from jaxsoftmax.training.steps import make_run_of_batches as make_run_of_batches
from jaxsoftmax.training.steps import make_run_of_steps as make_run_of_steps
from jaxsoftmax.training.steps import make_train_step as make_train_step

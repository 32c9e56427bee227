"""The checkpoints of :func:`jaxsoftmax.training.train`: the network's state, its configuration
and a fingerprint of its training data, so that a run is only ever resumed as itself."""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxsoftmax.data import Dataset
from jaxsoftmax.training.checkpoints import (
    check_same_settings,
    check_step_within,
    read_fields,
    read_state,
    save_state,
)
from jaxsoftmax.training.config import TrainConfig
from jaxsoftmax.training.state import TrainState

# Settings that change only how the same run is computed, or how long it is: a checkpoint may
# be resumed with other values.
NOT_COMPARED = ("steps", "devices")


def dataset_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of the training split's features and labels."""
    digest = hashlib.sha256()
    for array in (dataset.x_train, dataset.y_train):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str, state: TrainState, history: list[dict], config: TrainConfig, dataset: Dataset
) -> None:
    """Parameters, optimizer state, step, data key, history and config, as one ``.npz``."""
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    save_state(
        path,
        state,
        history,
        data_key=jax.random.key_data(data_key),
        config=json.dumps(config.to_dict()),
        dataset=json.dumps([dataset.name, dataset_fingerprint(dataset)]),
    )


def check_checkpoint(path: str, config: TrainConfig, dataset: Dataset) -> int:
    """Raises the ``ValueError`` that :func:`load_checkpoint` or :func:`train` would raise for
    resuming the checkpoint at ``path`` with ``config`` on ``dataset``, without loading its
    arrays or compiling anything; returns the checkpoint's step. A script calls it to report a
    mismatch before any work."""
    stored = read_fields(path, ("config", "dataset", "step"))
    check_stored_checkpoint(stored, path, config, dataset)
    step = int(stored["step"])
    check_step_within(step, config.steps)
    return step


def check_stored_checkpoint(stored, path: str, config: TrainConfig, dataset: Dataset) -> None:
    """``ValueError`` unless the archive ``stored`` (read from ``path``) was written by
    ``config`` (up to :data:`NOT_COMPARED`) on ``dataset``."""
    check_same_settings(path, json.loads(str(stored["config"])), config.to_dict(), NOT_COMPARED)
    if json.loads(str(stored["dataset"])) != [dataset.name, dataset_fingerprint(dataset)]:
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
        check_stored_checkpoint(stored, path, config, dataset)
        state, history = read_state(stored, template)
    return jax.tree.map(jnp.asarray, state), history


def check_processes_agree(checkpoint_path: str, found: bool) -> None:
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

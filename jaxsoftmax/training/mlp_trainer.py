""":func:`train`: the network of :mod:`jaxsoftmax.mlp` trained on a :class:`~jaxsoftmax.data.Dataset`,
data-parallel over a mesh, through the shared run loop (:func:`jaxsoftmax.training.run_loop`)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsoftmax.data import Dataset
from jaxsoftmax.training import state as train_state
from jaxsoftmax.training.batches import is_full_batch, process_minibatches, shard_full_batch
from jaxsoftmax.training.checkpoints import check_step_within, prepare_checkpoint
from jaxsoftmax.training.config import TrainConfig, TrainResult
from jaxsoftmax.training.devices import make_mesh
from jaxsoftmax.training.loop import all_finite, run_loop, start_or_resume
from jaxsoftmax.training.mlp_checkpoints import (
    check_processes_agree,
    load_checkpoint,
    save_checkpoint,
)
from jaxsoftmax.training.state import TrainState, init_state
from jaxsoftmax.training.steps import (
    check_config_for_dataset,
    make_evaluate,
    make_run_of_batches,
    make_run_of_steps,
)

Split = tuple[jax.Array, jax.Array, jax.Array | None]  # features, labels, mask of real rows


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
    replicated = NamedSharding(mesh, PartitionSpec())
    train_split, test_split, steps_data = place_splits(config, dataset, mesh)
    state, _ = init_state(config, dataset.num_features, dataset.num_classes)
    state = jax.device_put(state, replicated)
    run_steps = make_runner(config, dataset, mesh, steps_data)
    history_row = make_history_row(config, train_split, test_split)
    checkpoint_path = prepare_checkpoint(checkpoint_dir, writes=jax.process_index() == 0)
    if jax.process_count() > 1 and resume and checkpoint_path is not None:
        check_processes_agree(checkpoint_path, os.path.exists(checkpoint_path))
    load, save = checkpoint_functions(config, dataset, checkpoint_path, state)
    state, history, resumed_from = start_or_resume(
        checkpoint_path, resume, load=load, fresh=lambda: (state, [history_row(state, None)])
    )
    state, history = run_loop(
        state,
        history,
        steps=config.steps,
        eval_every=config.eval_every,
        run_steps=run_steps,
        history_row=lambda state, losses, seconds, length: history_row(state, np.mean(losses)),
        non_finite=non_finite,
        advice=f"Try a smaller learning_rate (was {config.learning_rate}) or a larger l2 "
        f"(was {config.l2}).",
        checkpoint_every=config.checkpoint_every,
        save=save,
        checkpoint_path=checkpoint_path,
        last_checkpoint=resumed_from,
        on_run_end=on_run_end,
    )
    jax.block_until_ready(state.params)
    return result(state, history, resumed_from, started, mesh)


def checkpoint_functions(
    config: TrainConfig, dataset: Dataset, checkpoint_path: str | None, template: TrainState
) -> tuple[Callable, Callable | None]:
    """``(load, save)`` for :func:`run_loop` and :func:`start_or_resume`: ``load(path)`` reads a
    checkpoint of this run, placed like ``template``, and refuses one beyond ``config.steps``;
    ``save(state, history)`` writes one in process 0 (``None`` without ``checkpoint_path``)."""

    def load(path: str) -> tuple[TrainState, list[dict]]:
        state, history = load_checkpoint(path, template, config, dataset)
        state = jax.device_put(state, template.step.sharding)
        check_step_within(int(state.step), config.steps)
        return state, history

    def save(state: TrainState, history: list[dict]) -> None:
        if jax.process_index() == 0:  # the one process that writes the checkpoints
            save_checkpoint(checkpoint_path, state, history, config, dataset)

    return load, None if checkpoint_path is None else save


def place_splits(config: TrainConfig, dataset: Dataset, mesh: Mesh) -> tuple[Split, Split, Split]:
    """``(train_split, test_split, steps_data)`` placed on ``mesh``: the splits the evaluations
    read and what the runs of steps take their batches from.

    With one process every device holds both splits; a full batch is also placed padded and
    split along its rows once, while minibatches are gathered from the copy on each device and
    then split. With several processes each places only its own rows of the splits, and each
    run's minibatches are placed by :func:`make_runner`.
    """
    if jax.process_count() > 1:
        train_split = shard_full_batch(dataset.x_train, dataset.y_train, mesh)
        return train_split, shard_full_batch(dataset.x_test, dataset.y_test, mesh), train_split
    replicated = NamedSharding(mesh, PartitionSpec())
    x_train, y_train, x_test, y_test = jax.device_put(
        (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test), replicated
    )
    train_split, test_split = (x_train, y_train, None), (x_test, y_test, None)
    if is_full_batch(config, len(dataset.y_train)):
        return train_split, test_split, shard_full_batch(dataset.x_train, dataset.y_train, mesh)
    return train_split, test_split, train_split


# The compiled functions of a configuration on a mesh, made once per process: a run resumed,
# repeated or evaluated again in the same process (a notebook, a test, a sweep that returns to
# a setting) reuses their programs instead of tracing and compiling them again. Keyed on the
# whole frozen config and the function that makes its optimizer (init_state's); a few
# configurations at most are kept.
@functools.lru_cache(maxsize=8)
def _compiled_run_of_steps(config: TrainConfig, mesh: Mesh, make_optimizer):
    return make_run_of_steps(config, make_optimizer(config), mesh)


@functools.lru_cache(maxsize=8)
def _compiled_run_of_batches(config: TrainConfig, mesh: Mesh, make_optimizer):
    return make_run_of_batches(config, make_optimizer(config), mesh)


@functools.lru_cache(maxsize=8)
def _compiled_evaluate(config: TrainConfig):
    return make_evaluate(config)


def make_runner(
    config: TrainConfig, dataset: Dataset, mesh: Mesh, steps_data: Split
) -> Callable[[TrainState, int], tuple[TrainState, np.ndarray]]:
    """``(state, num_steps) -> (state, losses)``, the losses on the host: the compiled run of
    steps over ``steps_data``, or, for minibatches with several processes, the run over each
    run's batches as every process places its own rows of them."""
    if jax.process_count() == 1 or is_full_batch(config, len(dataset.y_train)):
        run_of_steps = _compiled_run_of_steps(config, mesh, train_state.make_optimizer)
        x_steps, y_steps, where = steps_data

        def run(state: TrainState, num_steps: int):
            state, losses = run_of_steps(state, x_steps, y_steps, num_steps, where)
            return state, np.asarray(losses)

        return run
    run_of_batches = _compiled_run_of_batches(config, mesh, train_state.make_optimizer)

    def run_batches(state: TrainState, num_steps: int):
        batches = process_minibatches(
            config, dataset.x_train, dataset.y_train, mesh, int(state.step), num_steps
        )
        state, losses = run_of_batches(state, *batches)
        return state, np.asarray(losses)

    return run_batches


def make_history_row(
    config: TrainConfig, train_split: Split, test_split: Split
) -> Callable[[TrainState, Any], dict[str, Any]]:
    """``(state, batch_loss) -> row``: the step, the mean objective of the run's batches
    (``None`` before the first step), and the loss and accuracy on both splits."""
    evaluate = _compiled_evaluate(config)

    def history_row(state: TrainState, batch_loss) -> dict[str, Any]:
        on_train = evaluate(state.params, *train_split)
        on_test = evaluate(state.params, *test_split)
        return {
            "step": int(state.step),
            "batch_loss": None if batch_loss is None else float(batch_loss),
            "train_loss": float(on_train["loss"]),
            "train_accuracy": float(on_train["accuracy"]),
            "test_loss": float(on_test["loss"]),
            "test_accuracy": float(on_test["accuracy"]),
        }

    return history_row


def non_finite(state: TrainState, losses: np.ndarray, first: int, length: int) -> str | None:
    """What became NaN or infinite in a run of ``length`` steps from ``first``, in words: the
    loss (at which step), the parameters, the optimizer state; ``None`` if nothing did. An
    overflowed moment estimate can leave the loss and the parameters finite."""
    names = [
        name
        for name, finite in (
            ("loss", np.all(np.isfinite(losses))),
            ("parameters", all_finite(state.params)),
            ("optimizer state", all_finite(state.opt_state)),
        )
        if not finite
    ]
    if not names:
        return None
    when = f"between steps {first} and {first + length}"
    if "loss" in names:
        when = f"at step {first + int(np.argmin(np.isfinite(losses)))} ({when})"
    return f"the training {' and '.join(names)} became non-finite {when}"


def result(
    state: TrainState, history: list[dict], resumed_from: int | None, started: float, mesh: Mesh
) -> TrainResult:
    """The :class:`TrainResult` of a run that ended at ``state``."""
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
        processes=jax.process_count(),
    )

"""The run loop that every training in this project shares: runs of steps up to each
evaluation, a stop on a non-finite value, one history row per run, checkpoints, and resume.

:func:`jaxsoftmax.train` uses it for the network of :mod:`jaxsoftmax.mlp`, and
``experiments/lm_training.py`` (the language model and, through it, the distillation of
``experiments/distillation_training.py``) for their transformers. What differs
between them comes in as callables: how a run of steps is taken, what a history row holds, what
must be finite, how a checkpoint is written or read.

A run of a training of ``steps`` steps evaluated every ``eval_every`` ends at the next multiple
of ``eval_every`` (or at ``steps``), whatever step it starts from, so a resumed run evaluates and
checkpoints at the same steps as an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

from jaxsoftmax.training.config import NonFiniteLossError

State = TypeVar("State")  # any pytree with an integer ``step``: a TrainState, say


def all_finite(tree: Any) -> bool:
    """Whether every leaf of ``tree`` holds only finite numbers (fetched to the host)."""
    return all(
        bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree_util.tree_leaves(tree)
    )


def run_length(step: int, steps: int, eval_every: int) -> int:
    """The number of steps from ``step`` to the next evaluation: the next multiple of
    ``eval_every``, or ``steps`` if that comes first."""
    return min(steps, (step // eval_every + 1) * eval_every) - step


def start_or_resume(
    checkpoint_path: str | None,
    resume: bool,
    *,
    load: Callable[[str], tuple[State, list[dict]]],
    fresh: Callable[[], tuple[State, list[dict]]],
) -> tuple[State, list[dict], int | None]:
    """``(state, history, resumed_from)``: ``load(checkpoint_path)`` when ``resume`` and the
    checkpoint exists (``resumed_from`` its step), else ``fresh()`` (``resumed_from`` ``None``).
    ``load`` raises ``ValueError`` for a checkpoint that is not this run's."""
    if resume and checkpoint_path is not None and os.path.exists(checkpoint_path):
        state, history = load(checkpoint_path)
        return state, history, int(state.step)
    state, history = fresh()
    return state, history, None


def kept_checkpoint(last_checkpoint: int | None, checkpoint_path: str | None) -> str:
    """What a stopped run leaves on disk, in words."""
    if last_checkpoint is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint, step {last_checkpoint}, is kept in {checkpoint_path}"


def run_loop(
    state: State,
    history: list[dict],
    *,
    steps: int,
    eval_every: int,
    run_steps: Callable[[State, int], tuple[State, Any]],
    history_row: Callable[[State, Any, float, int], dict],
    non_finite: Callable[[State, Any, int, int], str | None],
    advice: str = "",
    error: type[Exception] = NonFiniteLossError,
    checkpoint_every: int | None = None,
    save: Callable[[State, list[dict]], None] | None = None,
    checkpoint_path: str | None = None,
    last_checkpoint: int | None = None,
    on_run_end: Callable[[dict, int], None] | None = None,
) -> tuple[State, list[dict]]:
    """Trains from ``state`` to step ``steps``, a run of steps at a time, and returns the final
    state and ``history`` with one row appended per run.

    Args:
      state: where to start (``state.step`` steps taken); history: the rows so far.
      steps: the total number of steps; eval_every: a run ends at each multiple of it.
      run_steps: ``(state, num_steps) -> (state, outputs)`` takes the run's steps; ``outputs``
        (per-step losses, say) should be on the host already, so that the run is timed whole.
      history_row: ``(state, outputs, seconds, num_steps) -> row``, after each run (``seconds``:
        the wall time of ``run_steps``), typically evaluating ``state``.
      non_finite: ``(new_state, outputs, first_step, num_steps) -> None`` when all is finite,
        else the problem in words (``"the training loss became non-finite at step 7"``): the
        loop then raises ``error(f"{problem}; {what is kept on disk}. {advice}")`` and the
        state of that run is neither recorded nor saved.
      checkpoint_every, save: ``save(state, history)`` after each run that ends at a multiple of
        ``checkpoint_every`` or at ``steps``; ``None``: no checkpoints.
      checkpoint_path, last_checkpoint: where ``save`` writes and the step of the checkpoint
        there when the loop starts (a resumed run's), for the error's words.
      on_run_end: ``on_run_end(row, num_steps)`` after each run (a progress bar, say).
    """
    history = list(history)
    while int(state.step) < steps:
        first = int(state.step)
        length = run_length(first, steps, eval_every)
        begun = time.perf_counter()
        new_state, outputs = run_steps(state, length)
        seconds = time.perf_counter() - begun
        problem = non_finite(new_state, outputs, first, length)
        if problem is not None:
            kept = kept_checkpoint(last_checkpoint, checkpoint_path)
            raise error(f"{problem}; {kept}. {advice}".rstrip())
        state = new_state
        row = history_row(state, outputs, seconds, length)
        history.append(row)
        done = int(state.step)
        if save is not None and (done % checkpoint_every == 0 or done == steps):
            save(state, history)
            last_checkpoint = done
        if on_run_end is not None:
            on_run_end(row, length)
    return state, history

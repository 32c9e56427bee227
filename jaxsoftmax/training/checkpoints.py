"""Checkpoints of any run whose state is a :class:`TrainState`: one ``.npz`` written atomically.

An archive holds the leaves of ``(params, opt_state)`` as ``leaf_0, leaf_1, ...``, the ``step``,
the ``history`` (JSON) and whatever the run adds to identify itself (its ``config`` as JSON, a
fingerprint of its data). :func:`jaxsoftmax.train` writes them, and so do the language model and
distillation scripts of ``experiments/``.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import jax
import numpy as np

from jaxsoftmax.training.files import remove_stale_temporaries, write_atomically
from jaxsoftmax.training.state import TrainState

CHECKPOINT_FILENAME = "checkpoint.npz"


def prepare_checkpoint(checkpoint_dir: str | None, *, writes: bool = True) -> str | None:
    """The checkpoint's path in ``checkpoint_dir`` (``None`` for ``None``). A process that
    ``writes`` creates the folder and removes the temporaries a run killed while it saved left
    there (:func:`remove_stale_temporaries`)."""
    if checkpoint_dir is None:
        return None
    path = os.path.join(checkpoint_dir, CHECKPOINT_FILENAME)
    if writes:
        os.makedirs(checkpoint_dir, exist_ok=True)
        remove_stale_temporaries(path)
    return path


def save_state(path: str, state: TrainState, history: list[dict], **fields: Any) -> None:
    """Writes ``state``, ``history`` and ``fields`` (each an array, or JSON text) to ``path``
    atomically (:func:`write_atomically`)."""
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
    arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["step"] = np.asarray(state.step)
    arrays["history"] = np.asarray(json.dumps(history))
    arrays.update({key: np.asarray(value) for key, value in fields.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())


def read_state(stored: Any, template: TrainState) -> tuple[TrainState, list[dict]]:
    """The state (NumPy arrays in the structure of ``template``, which may be abstract) and the
    history of an archive opened by ``np.load``."""
    treedef = jax.tree_util.tree_structure((template.params, template.opt_state))
    leaves = [stored[f"leaf_{i}"] for i in range(treedef.num_leaves)]
    params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
    step = np.asarray(stored["step"], np.int32)
    return TrainState(params, opt_state, step), json.loads(str(stored["history"]))


def read_fields(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the checkpoint at ``path``, without its parameters, or
    ``ValueError`` saying that it cannot be read and what to do."""
    try:
        with open(path, "rb") as file:  # closed whatever np.load makes of it
            archive = np.load(file, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with archive:
                return {key: archive[key] for key in keys}
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"the checkpoint {path} cannot be read ({type(error).__name__}: {error}); delete it "
            "to start from scratch, or use another output directory."
        ) from None


def check_same_settings(
    path: str, saved: dict[str, Any], wanted: dict[str, Any], ignored: tuple[str, ...]
) -> None:
    """``ValueError`` unless the settings ``saved`` in the checkpoint at ``path`` equal those
    ``wanted``, except the ``ignored`` ones (which change only how the same run is computed)."""
    different = {
        key: (saved.get(key), value)
        for key, value in wanted.items()
        if key not in ignored and saved.get(key) != value
    }
    if different:
        raise ValueError(
            f"the checkpoint {path} was written by a different configuration "
            f"(saved, requested): {different}; resume with the same flags or use another "
            "output directory."
        )


def check_step_within(step: int, steps: int) -> None:
    """``ValueError`` if a checkpoint at ``step`` lies beyond a run of ``steps`` steps."""
    if step > steps:
        raise ValueError(
            f"the checkpoint is at step {step}, beyond steps={steps}; "
            "ask for at least as many steps as were already taken."
        )

"""Files written so that a reader, or a crash, sees the old file or the new one, never a
partial one: checkpoints, and the metrics, histories and figures of the scripts."""

from __future__ import annotations

import os
import tempfile


def temporary_prefix(path: str) -> str:
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
        dir=directory, prefix=temporary_prefix(path), suffix=".tmp"
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
    prefix = temporary_prefix(path)
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

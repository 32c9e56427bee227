"""The devices a run uses: the one-axis ``"batch"`` mesh over them, and arrays split along it.

With several processes (``jax.distributed``) the mesh spans the first ``devices`` local devices
of every process, process 0's first, so each process's devices hold one contiguous range of the
rows of a batch, and each process places only that range (:func:`place_rows`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


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
    sharding = split_along(mesh, array.ndim, axis)
    own = [slice(None)] * array.ndim
    own[axis] = own_range(sharding, array.shape, axis)
    return jax.make_array_from_process_local_data(sharding, array[tuple(own)], array.shape)


def split_along(mesh: Mesh, ndim: int, axis: int) -> NamedSharding:
    """The sharding of an ``ndim``-dimensional array split along ``axis`` over ``"batch"``."""
    spec = [None] * ndim
    spec[axis] = BATCH_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def own_range(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> slice:
    """The indices along ``axis`` that this process's devices hold of an array of ``shape``
    split by ``sharding``: one range, since :func:`make_mesh` orders the devices by process."""
    held = [index[axis] for index in sharding.addressable_devices_indices_map(shape).values()]
    start = min(part.start or 0 for part in held)
    stop = max(shape[axis] if part.stop is None else part.stop for part in held)
    return slice(start, stop)

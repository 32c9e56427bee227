"""Joining a run of several JAX processes (``jax.distributed``): the flags a script such as
``train.py`` takes for it, and :func:`initialize`, which joins the others before JAX starts.

``launch.py`` passes these flags to each process it starts on this machine; on a cluster you
pass them yourself, or ``--distributed`` lets JAX read them from SLURM, Open MPI or a Cloud TPU
pod slice (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from common import non_negative_int, positive_int

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
DEFAULT_JOIN_TIMEOUT = 60  # seconds
DEFAULT_PEER_TIMEOUT = 30  # seconds


def host_and_port(text: str) -> str:
    """An argparse type: ``HOST:PORT`` with a port in [1, 65535]."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT, such as 127.0.0.1:1234 or node001:1234; got {text!r}"
        )
    return text


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags with which a script joins a run of several processes (see :func:`initialize`)."""
    group = parser.add_argument_group(
        "several processes (jax.distributed)",
        "Give all of --coordinator, --num-processes and --process-id (experiments/launch.py "
        "does), or --distributed on a cluster that JAX recognises; none of them for one process.",
    )
    group.add_argument(
        "--coordinator",
        type=host_and_port,
        default=None,
        metavar="HOST:PORT",
        help="address of process 0, which runs the coordinator there; the same for every process",
    )
    group.add_argument(
        "--num-processes",
        type=positive_int,
        default=None,
        help="how many processes take part; the same for every process",
    )
    group.add_argument(
        "--process-id",
        type=non_negative_int,
        default=None,
        help="this process's number, 0 to --num-processes - 1 (0 writes the outputs)",
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join a run whose settings JAX reads from the cluster (SLURM, Open MPI, a Cloud "
        "TPU pod slice); flags given among the three above take precedence",
    )
    group.add_argument(
        "--join-timeout",
        type=positive_int,
        default=DEFAULT_JOIN_TIMEOUT,
        help="seconds every process has to start and join the others; past it they stop",
    )
    group.add_argument(
        "--peer-timeout",
        type=positive_int,
        default=DEFAULT_PEER_TIMEOUT,
        help="seconds: a process silent for this long counts as dead and the others stop; "
        "a finished process waits at most this long for the others to finish",
    )


def initialize(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> bool:
    """Joins the run of several processes that the flags of :func:`add_flags` describe, with
    ``jax.distributed.initialize``; returns whether there is one. Call it before JAX does
    anything else. Inconsistent flags are usage errors (``parser.error``)."""
    given = {
        "--coordinator": arguments.coordinator,
        "--num-processes": arguments.num_processes,
        "--process-id": arguments.process_id,
    }
    missing = [flag for flag, value in given.items() if value is None]
    if not arguments.distributed:
        if len(missing) == len(given):
            return False
        if missing:
            first = next(flag for flag, value in given.items() if value is not None)
            parser.error(
                f"argument {first}: also needs {' and '.join(missing)}; expected all of "
                "--coordinator, --num-processes and --process-id, or --distributed"
            )
    if None not in (arguments.num_processes, arguments.process_id):
        if arguments.process_id >= arguments.num_processes:
            parser.error(
                f"argument --process-id: expected 0 to {arguments.num_processes - 1} (below "
                f"--num-processes {arguments.num_processes}); got {arguments.process_id}"
            )
    import jax

    # Collectives between processes on the CPU (JAX 0.10's default; set for older versions).
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    bind = None
    if arguments.coordinator is not None:
        host = arguments.coordinator.rpartition(":")[0]
        if host in LOOPBACK_HOSTS:  # listen on this machine only, not on every interface
            bind = arguments.coordinator
            if jax.config.jax_cpu_collectives_implementation == "gloo":
                _cpu_collectives_listen_on(host.strip("[]"))
    try:
        jax.distributed.initialize(
            coordinator_address=arguments.coordinator,
            num_processes=arguments.num_processes,
            process_id=arguments.process_id,
            coordinator_bind_address=bind,
            initialization_timeout=arguments.join_timeout,
            heartbeat_timeout_seconds=arguments.peer_timeout,
            shutdown_timeout_seconds=arguments.peer_timeout,
        )
    except ValueError as error:  # --distributed outside a cluster JAX recognises
        if not missing:
            raise
        parser.error(
            f"argument --distributed: JAX found no cluster to read {', '.join(missing)} from "
            f"({error}); expected a SLURM, Open MPI or Cloud TPU job, or give "
            f"{' and '.join(missing)}"
        )
    _same_program_ids_in_every_process()
    return True


def _same_program_ids_in_every_process() -> None:
    """Under jaxlib 0.12.1 or later, on the CPU, keeps JAX from running a program under
    different ids in different processes, which hangs the run at the program's first
    collective: JAX's persistent compilation cache is turned off, and so are the full Python
    tracebacks in the programs' source locations (each operation keeps its own line).

    jaxlib 0.12.1 runs the collectives of a program only between processes that launch it
    under the same id, which JAX derives from the executable's fingerprint (its run ids show
    in TF_CPP_VMODULE=collective_thunk=3 logs); otherwise every device waits in a gloo
    all-reduce forever. The fingerprint covers the program's source locations, which hold the
    Python traceback of its tracing: a program traced through another call (train.py's process
    0 trains through its progress bar, the others quietly) gets another fingerprint. And only
    process 0 loads programs from the persistent cache (the cache key includes the CPU
    topology's fingerprint, which differs in each process, and only process 0 writes entries):
    a loaded executable's fingerprint differs from the one the other processes compile.
    jaxlib 0.10.2, 0.11.2 and 0.12.0 run such programs. Can go once a jaxlib agrees on the
    ids; to check, run tests/test_multiprocess.py's two-process test without it (its
    second training case reloads the first's evaluation from the cache; its resumed train.py
    run traces through different calls).
    """
    import re

    import jax
    import jaxlib.version

    version = tuple(int(part) for part in re.findall(r"\d+", jaxlib.version.__version__)[:3])
    if version >= (0, 12, 1) and jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.config.update("jax_enable_compilation_cache", False)
        jax.config.update("jax_include_full_tracebacks_in_locations", False)


def _cpu_collectives_listen_on(host: str) -> None:
    """Makes the CPU collectives (gloo) of this process listen on ``host``.

    JAX lets gloo listen on the address of the machine's host name, which is an outside
    interface on most machines; a run on one machine needs only the loopback. JAX 0.10 has no
    setting for it, so this replaces its CPU backend's factory with one that passes ``host`` to
    gloo, before the backend starts; it can go once JAX has a setting of its own. Without the
    private functions it needs (another JAX version), it says so and changes nothing.
    """
    try:
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax

        def make_cpu_client():
            collectives = _jax.make_gloo_tcp_collectives(
                distributed_client=distributed.global_state.client, hostname=host
            )
            return xla_bridge.make_cpu_client(collectives=collectives)

        xla_bridge.register_backend_factory("cpu", make_cpu_client, priority=0, fail_quietly=False)
    except (ImportError, AttributeError, TypeError, RuntimeError) as error:
        print(
            f"warning: could not make the CPU collectives listen on {host} only ({error}); "
            "they listen on the address of this machine's host name",
            file=sys.stderr,
        )

"""Run a script as several JAX processes on this machine, as on a cluster (jax.distributed).

    python experiments/launch.py --processes 2 --devices-per-process 4 -- \\
        experiments/train.py --steps 1000 --out runs/two-processes

starts 2 copies of ``experiments/train.py``, each a JAX process with 4 virtual CPU devices of
its own (``XLA_FLAGS=--xla_force_host_platform_device_count=4``, ``JAX_PLATFORMS=cpu``), and
appends to each copy's flags ``--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I``
with a free port. The processes find each other through process 0's coordinator on 127.0.0.1
(nothing listens on another address) and run one program over the 8 devices, communicating
through CPU collectives (gloo). Each line a process prints is shown prefixed with its id,
``[0] ...``.

If a process fails (an error, or killed), the launcher gives the others ``--grace`` seconds
to stop on their own, kills those still running (a process waiting for a dead peer never
returns by itself before JAX's heartbeat timeout), says which process failed and how, and
exits with that process's status (128 + N for a signal N). ``--resume`` then continues from
the last checkpoint that process 0 wrote. Without the launcher (on a cluster), JAX itself ends
the others: train.py's ``--peer-timeout`` (30 s by default) bounds how long they wait for a
dead process, and ``--join-timeout`` (60 s) for one that never starts.

The script must accept those three flags: ``experiments/train.py`` does, through
:func:`add_flags` and :func:`initialize` of ``experiments/processes.py``, which a script of your
own can use too. On a real cluster you start one process per host (or per GPU) yourself, or
let SLURM or a TPU pod do it; docs/scaling.md has the commands.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
from common import non_negative_float, number, positive_float, positive_int

# ---------------------------------------------------------------------------------------------
# The launcher


def build_parser() -> argparse.ArgumentParser:
    parser = common.OneLineErrorParser(
        prog="launch.py",
        description=__doc__.split("\n\n")[0],
        epilog="Each process runs SCRIPT.py [SCRIPT FLAGS] --coordinator 127.0.0.1:PORT "
        "--num-processes N --process-id I.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--processes", type=positive_int, default=2, help="how many processes to start"
    )
    parser.add_argument(
        "--devices-per-process",
        type=positive_int,
        default=4,
        help="virtual CPU devices of each process",
    )
    parser.add_argument(
        "--port",
        type=number(int, lambda v: 0 <= v < 65536, "a port in [0, 65535]"),
        default=0,
        help="the coordinator's port on 127.0.0.1; 0: a free one",
    )
    parser.add_argument(
        "--grace",
        type=non_negative_float,
        default=5.0,
        help="seconds the other processes get to stop on their own after one fails, "
        "before they are killed",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        help="seconds after which every process still running is killed (exit status 124); "
        "None: no limit",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also pass on the processes' '[Gloo] ... connected' lines (one per process)",
    )
    usage = parser.format_usage().removeprefix("usage: ").strip()
    parser.usage = f"{usage} -- SCRIPT.py [SCRIPT FLAGS]"
    return parser


def parse_arguments(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    if "--" not in argv:
        if {"-h", "--help"} & set(argv):
            parser.parse_args(["--help"])
        parser.error(
            "expected -- and then the script and its flags, such as "
            f"-- experiments/train.py --steps 100; got {' '.join(argv) or 'nothing'}"
        )
    split = argv.index("--")
    arguments = parser.parse_args(argv[:split])
    arguments.command = argv[split + 1 :]
    if not arguments.command:
        parser.error("expected a script after --, such as -- experiments/train.py; got none")
    script = arguments.command[0]
    if not os.path.isfile(script):
        parser.error(f"argument SCRIPT: {script!r} is not a file; expected a script to run")
    return parser, arguments


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(devices: int) -> dict[str, str]:
    environment = dict(os.environ)
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S*", "", environment.get("XLA_FLAGS", "")
    )
    environment["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    environment["JAX_PLATFORMS"] = "cpu"
    environment["PYTHONUNBUFFERED"] = "1"  # lines reach the launcher as they are printed
    return environment


def _die_with_parent() -> None:
    """In the child, before the script starts (Linux): killed if the launcher dies, so that a
    launcher killed by a time limit leaves no process behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# The collectives library's connection reports ("[Gloo] Rank 0 is connected to 1 peer ranks"),
# one per process and peer group each run: dropped unless --verbose.
CONNECTION_LINE = re.compile(rb"^\[Gloo\] ")


def forward_lines(stream, target, prefix: str, lock: threading.Lock, quiet=None) -> None:
    """Copies ``stream`` to ``target``, each line (ended by ``\\n`` or a progress bar's ``\\r``)
    prefixed with ``prefix``; lines ``quiet`` matches are dropped."""
    pending = b""
    while chunk := os.read(stream.fileno(), 65536):
        pending += chunk
        *lines, pending = re.split(rb"(?<=[\r\n])", pending)
        if quiet is not None:
            lines = [line for line in lines if not quiet.match(line)]
        if lines:
            text = "".join(prefix + line.decode(errors="replace") for line in lines)
            with lock:
                target.write(text)
                target.flush()
    if pending:
        with lock:
            target.write(prefix + pending.decode(errors="replace") + "\n")
            target.flush()


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def exit_status(status: int) -> int:
    return 128 - status if status < 0 else status


def say(message: str) -> None:
    print(f"launch.py: {message}", file=sys.stderr, flush=True)


def run(arguments: argparse.Namespace) -> int:
    port = arguments.port or free_port()
    count = arguments.processes
    command = list(arguments.command)
    if command[0].endswith(".py"):
        command = [sys.executable, *command]
    environment = child_environment(arguments.devices_per_process)
    started = time.monotonic()
    processes = []
    for process_id in range(count):
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count)]
        processes.append(
            subprocess.Popen(
                [*command, *flags, "--process-id", str(process_id)],
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed with its children
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        )
    lock = threading.Lock()
    readers = [
        threading.Thread(
            target=forward_lines,
            args=(stream, target, f"[{i}] ", lock, None if arguments.verbose else CONNECTION_LINE),
            daemon=True,
        )
        for i, process in enumerate(processes)
        for stream, target in ((process.stdout, sys.stdout), (process.stderr, sys.stderr))
    ]
    for reader in readers:
        reader.start()

    def kill(process_ids) -> None:
        for i in process_ids:
            if processes[i].poll() is None:
                try:
                    os.killpg(processes[i].pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for i in process_ids:
            processes[i].wait()

    failed = None  # (process id, status, seconds)
    try:
        while True:
            statuses = [process.poll() for process in processes]
            elapsed = time.monotonic() - started
            if failed is None:
                failed = next(
                    ((i, s, elapsed) for i, s in enumerate(statuses) if s not in (None, 0)), None
                )
                if failed is not None:
                    running = statuses.count(None)
                    say(
                        f"process {failed[0]} {describe_status(failed[1])} after {elapsed:.1f} s; "
                        + (
                            f"the other {running} process(es) get {arguments.grace:g} s to stop, then are "
                            "killed"
                            if running
                            else "no other process is running"
                        )
                    )
            if None not in statuses:
                break
            if failed is not None and elapsed >= failed[2] + arguments.grace:
                alive = [i for i, s in enumerate(statuses) if s is None]
                say(f"killing process(es) {', '.join(map(str, alive))}, still running")
                kill(alive)
                break
            if arguments.timeout is not None and elapsed >= arguments.timeout:
                alive = [i for i, s in enumerate(statuses) if s is None]
                say(
                    f"--timeout {arguments.timeout:g} s reached; killing process(es) "
                    f"{', '.join(map(str, alive))}"
                )
                kill(alive)
                for reader in readers:
                    reader.join(timeout=5)
                return 124
            time.sleep(0.05)
    except KeyboardInterrupt:
        say("interrupted; killing every process")
        kill(range(count))
        return 130
    for reader in readers:
        reader.join(timeout=5)
    elapsed = time.monotonic() - started
    if failed is None:
        say(f"all {count} processes finished (status 0) in {elapsed:.1f} s")
        return 0
    say(
        f"failed: process {failed[0]} {describe_status(failed[1])}; every process had ended "
        f"{elapsed - failed[2]:.1f} s later"
    )
    return exit_status(failed[1])


def _interrupt(signal_number, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    _, arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop ends the processes too
    return run(arguments)


if __name__ == "__main__":
    sys.exit(main())

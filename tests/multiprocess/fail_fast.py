"""A stand-in for a script under ``experiments/launch.py``, without JAX, for the launcher's tests.

``fail_fast.py fail`` (then the launcher's flags): process 1 fails at once (exit status 3) and
every other process waits; ``fail_fast.py wait``: every process waits. Each prints the flags
it was given. A waiting process ignores SIGTERM, as a JAX process under jax.distributed does
(JAX takes it for a preemption notice), so only SIGKILL ends it.
"""

import signal
import sys
import time


def main() -> int:
    mode, *flags = sys.argv[1:]
    process_id = int(flags[flags.index("--process-id") + 1])
    print(f"flags: {' '.join(flags)}", flush=True)
    if mode == "fail" and process_id == 1:
        print("failing on purpose", file=sys.stderr, flush=True)
        return 3
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())

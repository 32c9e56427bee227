"""``experiments/train.py``, one of whose processes is killed mid-run: a host lost.

Not collected by pytest: ``tests/test_multiprocess.py`` runs it through
``experiments/launch.py``. Its own two flags come first and the rest are train.py's::

    python experiments/launch.py -- tests/multiprocess/train_until_killed.py \\
        --kill-process 1 --kill-after-step 30 [train.py flags]

Process ``--kill-process`` sends itself SIGKILL as soon as the run ending at step
``--kill-after-step`` has finished (after the checkpoint of a multiple of ``--checkpoint-every``
below it, if any): no Python cleanup, no message, as when a host goes down. The other
processes then wait for it in their next all-reduce.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import train  # noqa: E402  (experiments/train.py)

from jaxsoftmax import training  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill-process", type=int, required=True, help="the process to kill")
    parser.add_argument("--kill-after-step", type=int, required=True, help="when")
    arguments, train_flags = parser.parse_known_args()
    train_for_real = training.train

    def train_until_killed(*args, on_run_end=None, **kwargs):
        import jax

        def after_run(row, steps_in_run):
            if on_run_end is not None:
                on_run_end(row, steps_in_run)
            if row["step"] >= arguments.kill_after_step:
                if jax.process_index() == arguments.kill_process:
                    os.kill(os.getpid(), signal.SIGKILL)

        return train_for_real(*args, on_run_end=after_run, **kwargs)

    training.train = train_until_killed  # train.py calls training.train, or train_quietly does
    return train.main(train_flags)


if __name__ == "__main__":
    sys.exit(main())

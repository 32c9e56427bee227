"""Data-parallel training against one device: how far apart the parameters are after K steps.

Trains the same configuration (default: CS231n's spiral case of ``experiments/train.py``) on one
device and on ``--devices N``, and, as a control, on one device with the training rows in reverse
order: the same full-batch loss mathematically, only another order of float additions. For a
few hundred steps the runs agree to float rounding; after that gradient descent on the spiral
amplifies any rounding difference (the control drifts as far as N devices do, or farther), and
the runs end in different but equally good minima.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/data_parallel.py \\
        --devices 8 --json experiments/results/data_parallel.json
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
from common import positive_counts, positive_int, writable_file

from jaxsoftmax import data, training


def max_difference(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def build_parser():
    parser = common.script_parser(__doc__)
    parser.add_argument(
        "--devices", type=positive_int, default=None, help="local devices to use; None: all"
    )
    parser.add_argument(
        "--steps",
        type=positive_counts("step counts", "10,100"),
        default="10,100,200,500,1000,10000",
        help="comma-separated step counts, each a fresh run",
    )
    parser.add_argument(
        "--num-examples",
        type=positive_int,
        default=None,
        help="spiral points per class; None: the dataset's default",
    )
    parser.add_argument("--hidden", type=positive_int, default=100, help="hidden width")
    parser.add_argument(
        "--json",
        type=writable_file,
        default=None,
        help="also write the table here; None: do not",
    )
    common.add_cache_flag(parser)
    return parser


def compare(steps: int, hidden: int, devices: int, spiral, reversed_rows) -> dict:
    """A row of the table: ``steps`` steps on one device, on ``devices``, and on one device with
    the rows reversed; the largest parameter differences and each run's metrics."""
    every = min(steps, 100)
    config = dict(hidden=(hidden,), steps=steps, eval_every=every, checkpoint_every=every)
    one = training.train(training.TrainConfig(**config, devices=1), spiral)
    many = training.train(training.TrainConfig(**config, devices=devices), spiral)
    control = training.train(training.TrainConfig(**config, devices=1), reversed_rows)
    runs = (one, many, control)
    return {
        "steps": steps,
        "devices": many.devices,
        "max_param_diff_1_vs_n": max_difference(one.params, many.params),
        "max_param_diff_1_vs_reversed_rows": max_difference(one.params, control.params),
        "final_loss": [run.final_loss for run in runs],
        "train_accuracy": [run.train_accuracy for run in runs],
        "test_accuracy": [run.test_accuracy for run in runs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = common.parse_flags(parser, argv)
    try:
        devices = len(training.select_devices(arguments.devices, name="--devices"))
    except ValueError as error:
        parser.error(str(error))  # the message names --devices

    spiral = data.load("spiral", num_examples=arguments.num_examples)
    reversed_rows = dataclasses.replace(
        spiral, x_train=spiral.x_train[::-1].copy(), y_train=spiral.y_train[::-1].copy()
    )
    print(
        f"spiral, {len(spiral.y_train)} points, hidden {arguments.hidden}, full-batch gradient "
        f"descent; 1 device against {devices}, and against 1 device with the rows reversed"
    )
    print(
        f"{'steps':>6} {'|1 - N| params':>15} {'|1 - rev| params':>17} "
        f"{'loss 1':>9} {'loss N':>9} {'loss rev':>9} {'acc 1':>6} {'acc N':>6}"
    )
    rows = []
    for steps in arguments.steps:
        row = compare(steps, arguments.hidden, devices, spiral, reversed_rows)
        rows.append(row)
        (loss_one, loss_many, loss_control), accuracy = row["final_loss"], row["train_accuracy"]
        print(
            f"{steps:>6} {row['max_param_diff_1_vs_n']:>15.3g} "
            f"{row['max_param_diff_1_vs_reversed_rows']:>17.3g} {loss_one:>9.6f} "
            f"{loss_many:>9.6f} {loss_control:>9.6f} {accuracy[0]:>6.4f} {accuracy[1]:>6.4f}",
            flush=True,
        )
    if arguments.json:
        result = {
            "device": common.device_description(),
            "devices": devices,
            "columns": "final_loss, train_accuracy, test_accuracy: [1 device, N devices, 1 "
            "device with the training rows reversed]",
            "rows": rows,
        }
        common.write_json(arguments.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

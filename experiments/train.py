"""Train CS231n's two-layer network on a small dataset and write its metrics, history and plots.

The defaults reproduce CS231n's "minimal neural network case study": a spiral of 3 x 100
points, one hidden layer of 100 ReLU units, full-batch gradient descent with step 1.0,
l2 = 1e-3, 10,000 steps (training accuracy about 0.98; ``--hidden 0``, the linear softmax
classifier, about 0.5).

    python experiments/train.py --out runs/spiral
    python experiments/train.py --hidden 0 --out runs/spiral_linear
    python experiments/train.py --dataset digits --standardize --optimizer adam --lr 1e-3 \\
        --batch-size 64 --steps 2000 --out runs/digits

Training runs data-parallel on all local devices (the batch split across them, the parameters
replicated; the same result as one device up to float rounding); ``--devices N`` uses the first N.
Over thousands of steps the spiral case amplifies rounding differences of any kind, so N devices
end in a different, equally good minimum (``experiments/data_parallel.py`` measures it). On a CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` gives 8 virtual devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/train.py --devices 8

Several processes (``jax.distributed``), each feeding only its own rows, train as one: on one
machine through ``experiments/launch.py``, on a cluster with ``--distributed`` or the process
flags (docs/scaling.md):

    python experiments/launch.py --processes 2 --devices-per-process 4 -- experiments/train.py

Writes into ``--out``: metrics.json, history.csv, loss.png, decision_boundary.png (2-D data
only) and checkpoint.npz (``--resume`` continues from it).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # what the scripts share
import processes  # the flags that join a run of several processes
from common import coefficient_below_one, non_negative_float, positive_float, positive_int

from jaxsoftmax import data, mlp, training

OUTPUTS_WRITTEN_ATOMICALLY = ("metrics.json", "history.csv")  # and the checkpoint, by training


def parse_hidden(text: str) -> tuple[int, ...]:
    """``"100"`` -> (100,), ``"64,32"`` -> (64, 32), ``"0"`` -> () (a linear classifier)."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden {text!r}: expected comma-separated integer widths such as 100 or 64,32"
        ) from None
    if widths == (0,):
        return ()
    if any(width <= 0 for width in widths):
        raise argparse.ArgumentTypeError(
            f"--hidden {text!r}: widths must be positive (0 alone means no hidden layer)"
        )
    return widths


def parse_class_weights(text: str) -> tuple[float, ...]:
    """``"1,2,0.5"`` -> (1.0, 2.0, 0.5); their number is checked against the dataset's classes."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, one weight per class, such as 1,2,0.5; got {text!r}"
        ) from None


# The flags that set a field of training.TrainConfig, its default theirs: (field, type or
# choices, help), or a flag several scripts share (common.SHARED_FLAGS); --checkpoint-every,
# whose default differs, is written out below.
FLAGS = (
    ("hidden", parse_hidden, "hidden widths, comma-separated; 0 = linear softmax classifier"),
    ("activation", tuple(sorted(mlp.ACTIVATIONS)), "activation of the hidden layers"),
    (
        "optimizer",
        training.OPTIMIZERS,
        "sgd: plain gradient descent; momentum: SGD with --momentum; adam",
    ),
    ("learning_rate", positive_float, "learning rate, > 0"),
    (
        "momentum",
        coefficient_below_one,
        "momentum coefficient in [0, 1); used only by --optimizer momentum",
    ),
    ("l2", non_negative_float, "L2 weight penalty, >= 0"),
    ("batch_size", positive_int, "minibatch size; None: full batch"),
    ("init_scheme", mlp.INIT_SCHEMES, "weight initialisation"),
    ("init_scale", positive_float, "scale of the initial weights, > 0"),
    ("label_smoothing", float, "label smoothing in [0, 1]"),
    ("class_weights", parse_class_weights, "comma-separated, one per class; None: all 1"),
    ("logit_softcap", float, "tanh soft cap of the logits, > 0"),
    *("z_loss", "steps", "seed", "eval_every", "devices"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = common.script_parser(__doc__)
    parser.add_argument("--dataset", choices=data.DATASETS, default="spiral", help="training data")
    parser.add_argument(
        "--num-examples",
        type=positive_int,
        default=None,
        help="points per class (spiral) or in total (moons, circles); None: the dataset's own",
    )
    parser.add_argument(
        "--standardize",
        action="store_true",
        help="standardise features with the training statistics",
    )
    common.add_field_flags(parser, training.TrainConfig(), FLAGS)
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        help=f"a multiple of --eval-every; None: every {training.DEFAULT_CHECKPOINT_EVERY} "
        "steps, rounded up to one",
    )
    common.add_output_flags(parser, "runs/train", "output directory", "loss.png and the boundary")
    processes.add_flags(parser)
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_arguments(arguments: argparse.Namespace) -> training.TrainConfig:
    return training.TrainConfig(
        **common.fields_of(arguments, FLAGS), checkpoint_every=arguments.checkpoint_every
    )


def config_used(config: training.TrainConfig) -> dict:
    """``config.to_dict()`` less the settings this run ignored (``momentum`` unless
    ``optimizer="momentum"``), as recorded in metrics.json."""
    used = config.to_dict()
    if config.optimizer != "momentum":
        del used["momentum"]
    return used


def class_colours(num_classes: int) -> np.ndarray:
    """One RGBA colour per class, ``[num_classes, 4]``, indexed by class label: the decision
    boundary's regions and points are both drawn with it, so a class has one colour."""
    from matplotlib import colormaps

    colour_map = colormaps["Spectral"]
    return np.asarray(colour_map(np.linspace(0.0, 1.0, max(num_classes, 2))))[:num_classes]


def plot_history(path: str, history: list[dict], title: str) -> None:
    plt = common.pyplot()
    steps = [row["step"] for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, metric, settings in (
        (loss_axes, "loss", dict(ylabel="loss (cross-entropy + L2)", yscale="log")),
        (accuracy_axes, "accuracy", dict(ylabel="accuracy", ylim=(0, 1.02))),
    ):
        lines = {
            split: [row[f"{split}_{metric}"] for row in history] for split in ("train", "test")
        }
        common.plot_lines(axes, steps, lines, xlabel="step", **settings)
    figure.suptitle(title)
    common.write_figure(figure, path)


def plot_decision_boundary(
    path: str, params: mlp.Params, dataset: data.Dataset, activation: str, title: str
) -> None:
    plt = common.pyplot()
    x, y = dataset.x_train, dataset.y_train
    low, high = x.min(axis=0) - 0.5, x.max(axis=0) + 0.5
    grid_x, grid_y = np.meshgrid(
        np.linspace(low[0], high[0], 300), np.linspace(low[1], high[1], 300)
    )
    grid = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.float32)
    classes = np.asarray(jax.jit(mlp.predict, static_argnums=2)(params, grid, activation))
    colours = class_colours(dataset.num_classes)
    figure, axes = plt.subplots(figsize=(6, 6))
    axes.contourf(  # region k, between levels k - 0.5 and k + 0.5, gets colours[k]
        grid_x,
        grid_y,
        classes.reshape(grid_x.shape),
        alpha=0.35,
        colors=colours,
        levels=np.arange(dataset.num_classes + 1) - 0.5,
    )
    axes.scatter(x[:, 0], x[:, 1], c=colours[np.asarray(y)], s=18, edgecolors="k", linewidths=0.5)
    axes.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]), title=title)
    common.write_figure(figure, path)


def train_quietly(
    config: training.TrainConfig, data_set: data.Dataset, arguments: argparse.Namespace
) -> int:
    """Process 1, 2, ... of a run of several: the same training as process 0, which prints the
    report and writes the files; this one reads the checkpoint on --resume."""
    try:
        training.train(config, data_set, checkpoint_dir=arguments.out, resume=arguments.resume)
    except training.NonFiniteLossError as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 2
    return 0


def load_inputs(parser: argparse.ArgumentParser, arguments: argparse.Namespace):
    """``(devices, config, dataset, checkpoint)`` (:func:`common.checkpoint_to_resume`) of the
    run the flags ask for. Flags that contradict each other or the data are usage errors (exit
    status 2), found before anything is computed: the library's checks, reported under the
    flag's name."""
    try:
        devices = training.select_devices(arguments.devices, name="--devices")
        config = config_from_arguments(arguments)
        dataset = data.load(
            arguments.dataset,
            seed=arguments.seed,
            standardized=arguments.standardize,
            num_examples=arguments.num_examples,
        )
        training.check_config_for_dataset(config, dataset)
    except (ValueError, TypeError) as error:
        parser.error(common.name_the_flag(str(error), arguments))
    if config.batch_size is not None and config.batch_size > len(dataset.y_train):
        # The library trains such a run full batch; the flag would record what did not run.
        parser.error(
            f"--batch-size {config.batch_size} is more than the {len(dataset.y_train)} training "
            f"examples of {dataset.name!r}: leave --batch-size out to train full batch."
        )
    common.check_output_directory(parser, arguments.out)
    checkpoint = common.checkpoint_to_resume(
        parser, arguments, lambda path: training.check_checkpoint(path, config, dataset)
    )
    return devices, config, dataset, checkpoint


def describe_devices(devices: list, out: str) -> None:
    """The line on the devices this process trains on (several processes: and who writes)."""
    if jax.process_count() == 1:
        print(
            f"device: {common.device_description()} ({jax.device_count()} visible), training "
            f"data-parallel on {len(devices)}"
        )
        return
    print(
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{common.device_description()} ({jax.local_device_count()} local), training "
        f"data-parallel on {len(devices)} here, {len(devices) * jax.process_count()} in all"
        + ("" if jax.process_index() == 0 else f"; process 0 writes {out}")
    )


def architecture(config: training.TrainConfig, dataset: data.Dataset) -> str:
    """The layers' widths, ``"2 -> 100 -> 3"``."""
    return " -> ".join(str(w) for w in [dataset.num_features, *config.hidden, dataset.num_classes])


def metrics(result, config: training.TrainConfig, dataset: data.Dataset, arguments) -> dict:
    """metrics.json of a run."""
    return {
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "final_loss": result.final_loss,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "train_seconds_note": common.seconds_note(
            "wall time of training.train in this process, compilation included",
            result.resumed_from,
        ),
        "device": common.device_description(),
        "devices": result.devices,
        "processes": result.processes,
        "versions": common.library_versions(),
        "dataset": {
            "name": dataset.name,
            "train_examples": len(dataset.y_train),
            "test_examples": len(dataset.y_test),
            "features": dataset.num_features,
            "classes": dataset.num_classes,
            "split": dataset.split,
            "standardized": arguments.standardize,
            "num_examples": arguments.num_examples,
        },
        "config": config_used(config),
    }


def plot(out: str, result, config: training.TrainConfig, dataset: data.Dataset) -> list[str]:
    """loss.png, and for 2-D data decision_boundary.png; returns their names."""
    kind = config.activation if config.hidden else "linear softmax classifier"
    title = f"{dataset.name}, {architecture(config, dataset)} {kind}, {config.steps} steps"
    plot_history(os.path.join(out, "loss.png"), result.history, title)
    if dataset.num_features != 2:
        return ["loss.png"]
    plot_decision_boundary(  # on this process's device: the others may have exited
        os.path.join(out, "decision_boundary.png"),
        jax.tree.map(np.asarray, result.params),
        dataset,
        config.activation,
        f"{title}\ntrain accuracy {result.train_accuracy:.3f}",
    )
    return ["loss.png", "decision_boundary.png"]


def outcome(result) -> str:
    """The line on the trained model and the steps this run took."""
    ran = common.steps_ran(result.steps, result.resumed_from)
    return (
        f"train accuracy {result.train_accuracy:.4f}, test accuracy {result.test_accuracy:.4f}, "
        f"final loss {result.final_loss:.4f}, {ran} in {result.train_seconds:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = common.parse_flags(parser, argv)
    processes.initialize(parser, arguments)  # several processes: join them before JAX starts
    devices, config, dataset, checkpoint = load_inputs(parser, arguments)
    describe_devices(devices, arguments.out)
    # Process 0 alone prints the run's report and writes its files; every process trains.
    if jax.process_index() != 0:
        return train_quietly(config, dataset, arguments)
    print(
        f"dataset: {dataset.name} ({len(dataset.y_train)} train, {len(dataset.y_test)} test), "
        f"network: {architecture(config, dataset)}, {config.activation}, {config.optimizer} "
        f"lr={config.learning_rate}"
    )
    created_out = not os.path.exists(arguments.out)
    common.start_output(arguments, OUTPUTS_WRITTEN_ATOMICALLY, checkpoint)
    result = common.train_with_progress(
        functools.partial(training.train, config, dataset),
        arguments,
        config.steps,
        lambda row: {
            "loss": f"{row['batch_loss']:.4f}",
            "train_acc": f"{row['train_accuracy']:.3f}",
        },
        mininterval=0.5,
    )
    if result is None:  # stopped on a non-finite value
        if created_out and not os.listdir(arguments.out):  # no checkpoint: leave nothing behind
            os.rmdir(arguments.out)
        return 2
    common.write_json(
        os.path.join(arguments.out, "metrics.json"), metrics(result, config, dataset, arguments)
    )
    common.write_history(os.path.join(arguments.out, "history.csv"), result.history)
    written = ["metrics.json", "history.csv", training.CHECKPOINT_FILENAME]
    if not arguments.no_plots:
        written += plot(arguments.out, result, config, dataset)
    print(outcome(result))
    common.report_written(arguments.out, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())

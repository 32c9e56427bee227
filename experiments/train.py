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


def build_parser() -> argparse.ArgumentParser:
    defaults = training.TrainConfig()
    parser = common.OneLineErrorParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    parser.add_argument(
        "--hidden",
        type=parse_hidden,
        default=defaults.hidden,
        help="hidden widths, comma-separated; 0 = linear softmax classifier",
    )
    parser.add_argument(
        "--activation",
        choices=sorted(mlp.ACTIVATIONS),
        default=defaults.activation,
        help="activation of the hidden layers",
    )
    parser.add_argument(
        "--optimizer",
        choices=training.OPTIMIZERS,
        default=defaults.optimizer,
        help="sgd: plain gradient descent; momentum: SGD with --momentum; adam",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=defaults.learning_rate,
        help="learning rate, > 0",
    )
    parser.add_argument(
        "--momentum",
        type=coefficient_below_one,
        default=defaults.momentum,
        help="momentum coefficient in [0, 1); used only by --optimizer momentum",
    )
    parser.add_argument(
        "--l2", type=non_negative_float, default=defaults.l2, help="L2 weight penalty, >= 0"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=defaults.steps, help="total training steps"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="minibatch size; None: full batch",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the data and initialisation"
    )
    parser.add_argument(
        "--init-scheme",
        choices=mlp.INIT_SCHEMES,
        default=defaults.init_scheme,
        help="weight initialisation",
    )
    parser.add_argument(
        "--init-scale",
        type=positive_float,
        default=defaults.init_scale,
        help="scale of the initial weights, > 0",
    )
    parser.add_argument(
        "--label-smoothing", type=float, default=0.0, help="label smoothing in [0, 1]"
    )
    parser.add_argument(
        "--class-weights",
        type=parse_class_weights,
        default=None,
        help="comma-separated, one per class; None: all 1",
    )
    parser.add_argument(
        "--z-loss", type=non_negative_float, default=0.0, help="weight of the z-loss, >= 0"
    )
    parser.add_argument(
        "--logit-softcap", type=float, default=None, help="tanh soft cap of the logits, > 0"
    )
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        default=defaults.eval_every,
        help="steps per compiled run, one history row each",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        help=f"a multiple of --eval-every; None: every {training.DEFAULT_CHECKPOINT_EVERY} "
        "steps, rounded up to one",
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        help="train data-parallel on the first N local devices (of each process); None: all",
    )
    parser.add_argument("--out", default="runs/train", help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    parser.add_argument("--no-plots", action="store_true", help="skip loss.png and the boundary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_cache_flag(parser)
    processes.add_flags(parser)
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_arguments(arguments: argparse.Namespace) -> training.TrainConfig:
    return training.TrainConfig(
        hidden=arguments.hidden,
        activation=arguments.activation,
        optimizer=arguments.optimizer,
        learning_rate=arguments.lr,
        momentum=arguments.momentum,
        l2=arguments.l2,
        steps=arguments.steps,
        batch_size=arguments.batch_size,
        seed=arguments.seed,
        init_scheme=arguments.init_scheme,
        init_scale=arguments.init_scale,
        label_smoothing=arguments.label_smoothing,
        class_weights=arguments.class_weights,
        z_loss=arguments.z_loss,
        logit_softcap=arguments.logit_softcap,
        eval_every=arguments.eval_every,
        checkpoint_every=arguments.checkpoint_every,
        devices=arguments.devices,
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
    loss_axes.plot(steps, [row["train_loss"] for row in history], label="train")
    loss_axes.plot(steps, [row["test_loss"] for row in history], label="test")
    loss_axes.set(xlabel="step", ylabel="loss (cross-entropy + L2)", yscale="log")
    loss_axes.legend()
    accuracy_axes.plot(steps, [row["train_accuracy"] for row in history], label="train")
    accuracy_axes.plot(steps, [row["test_accuracy"] for row in history], label="test")
    accuracy_axes.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    accuracy_axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    common.save_figure(figure, path)
    plt.close(figure)


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
    figure.tight_layout()
    common.save_figure(figure, path)
    plt.close(figure)


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    common.enable_compilation_cache(arguments)
    processes.initialize(parser, arguments)  # several processes: join them before JAX starts
    # Process 0 alone prints the run's report and writes its files; every process trains.
    lead = jax.process_index() == 0
    # Flags that contradict each other or the data are usage errors (exit status 2), found
    # before anything is computed: the library's checks, reported under the flag's name.
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
    problem = common.output_directory_problem(arguments.out)
    if problem is not None:
        parser.error(f"argument --out: {problem}")
    checkpoint_path = os.path.join(arguments.out, training.CHECKPOINT_FILENAME)
    resuming_from = None
    if arguments.resume and os.path.exists(checkpoint_path):
        try:  # another configuration, other data, or more steps than asked for
            resuming_from = training.check_checkpoint(checkpoint_path, config, dataset)
        except (ValueError, OSError, KeyError) as error:
            parser.error(f"argument --resume: {error}")
    device = jax.devices()[0]
    device_description = f"{device.platform}: {device.device_kind}"
    if jax.process_count() == 1:
        print(
            f"device: {device_description} ({jax.device_count()} visible), training "
            f"data-parallel on {len(devices)}"
        )
    else:
        print(
            f"process {jax.process_index()} of {jax.process_count()}: "
            f"{device_description} ({jax.local_device_count()} local), training data-parallel "
            f"on {len(devices)} here, {len(devices) * jax.process_count()} in all"
            + ("" if lead else f"; process 0 writes {arguments.out}")
        )
    if not lead:
        return train_quietly(config, dataset, arguments)
    architecture = " -> ".join(
        str(w) for w in [dataset.num_features, *config.hidden, dataset.num_classes]
    )
    print(
        f"dataset: {dataset.name} ({len(dataset.y_train)} train, {len(dataset.y_test)} test), "
        f"network: {architecture}, {config.activation}, {config.optimizer} lr={config.learning_rate}"
    )
    if arguments.resume:
        print(common.resume_note(resuming_from, checkpoint_path))
    created_out = not os.path.exists(arguments.out)
    common.prepare_output(arguments.out, OUTPUTS_WRITTEN_ATOMICALLY)
    result = common.train_with_progress(
        lambda on_run_end: training.train(
            config,
            dataset,
            checkpoint_dir=arguments.out,
            resume=arguments.resume,
            on_run_end=on_run_end,
        ),
        config.steps,
        lambda row: {
            "loss": f"{row['batch_loss']:.4f}",
            "train_acc": f"{row['train_accuracy']:.3f}",
        },
        disabled=arguments.no_progress,
        mininterval=0.5,
    )
    if result is None:  # stopped on a non-finite value
        if created_out and not os.listdir(arguments.out):  # no checkpoint: leave nothing behind
            os.rmdir(arguments.out)
        return 2

    metrics = {
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "final_loss": result.final_loss,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "train_seconds_note": "wall time of training.train in this process, compilation included"
        + (f"; resumed from step {result.resumed_from}" if result.resumed_from is not None else ""),
        "device": device_description,
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
    common.write_json(os.path.join(arguments.out, "metrics.json"), metrics)
    common.write_history(os.path.join(arguments.out, "history.csv"), result.history)
    kind = config.activation if config.hidden else "linear softmax classifier"
    title = f"{dataset.name}, {architecture} {kind}, {config.steps} steps"
    if not arguments.no_plots:
        plot_history(os.path.join(arguments.out, "loss.png"), result.history, title)
        if dataset.num_features == 2:
            plot_decision_boundary(  # on this process's device: the others may have exited
                os.path.join(arguments.out, "decision_boundary.png"),
                jax.tree.map(np.asarray, result.params),
                dataset,
                config.activation,
                f"{title}\ntrain accuracy {result.train_accuracy:.3f}",
            )
    if result.resumed_from is None:
        ran = f"{result.steps} steps"
    else:
        ran = (
            f"{result.steps - result.resumed_from} steps this run, resumed from step "
            f"{result.resumed_from} (now at step {result.steps}),"
        )
    print(
        f"train accuracy {result.train_accuracy:.4f}, test accuracy {result.test_accuracy:.4f}, "
        f"final loss {result.final_loss:.4f}, {ran} in {result.train_seconds:.2f} s"
    )
    written = ["metrics.json", "history.csv", training.CHECKPOINT_FILENAME]
    if not arguments.no_plots:
        written.append("loss.png")
        if dataset.num_features == 2:
            written.append("decision_boundary.png")
    print(f"wrote {arguments.out}/" + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

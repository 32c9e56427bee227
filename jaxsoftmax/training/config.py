"""The settings of a training run, the error that stops one, and what a run returns."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxsoftmax import mlp

OPTIMIZERS = ("sgd", "momentum", "adam")
DEFAULT_CHECKPOINT_EVERY = 1000  # steps, rounded up to a multiple of eval_every


class NonFiniteLossError(FloatingPointError):
    """The training loss, the parameters or the optimizer state became NaN or infinite; the run
    was stopped."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a run. The defaults are CS231n's two-layer spiral case study.

    Attributes:
      hidden: hidden-layer widths; ``()`` is a linear softmax classifier.
      activation: ``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``"identity"``.
      optimizer: ``"sgd"`` (plain gradient descent), ``"momentum"`` (SGD with heavy-ball momentum
        ``momentum``) or ``"adam"``.
      learning_rate: the step size (CS231n: 1.0 for gradient descent).
      momentum: the momentum coefficient of ``optimizer="momentum"``.
      l2: the weight penalty ``0.5 * l2 * sum ||W||^2`` (CS231n's ``reg``, 1e-3).
      steps: the total number of optimizer steps.
      batch_size: examples per step; ``None`` (or at least the training-set size) is full batch.
      seed: the one seed of the run: initialisation and batch order derive from it.
      init_scheme, init_scale: passed to :func:`jaxsoftmax.mlp.init` (CS231n: 0.01 * randn).
      label_smoothing, class_weights, z_loss, logit_softcap: options of the core cross-entropy.
      eval_every: steps per compiled run; the history gets one row per run.
      checkpoint_every: steps between checkpoints, a multiple of ``eval_every``; ``None`` (the
        default) is every 1000 steps rounded up to a multiple of ``eval_every`` (1000 for the
        default ``eval_every=100``), and the config holds that number.
      devices: train data-parallel on the first ``devices`` local devices; ``None`` uses all of
        them (one on an ordinary CPU). With several processes (``jax.distributed``), the first
        ``devices`` of each process. Not a hyperparameter: any count gives the same run up to
        float rounding, so a checkpoint may be resumed on another count (or process count).
    """

    hidden: tuple[int, ...] = (100,)
    activation: str = "relu"
    optimizer: str = "sgd"
    learning_rate: float = 1.0
    momentum: float = 0.9
    l2: float = 1e-3
    steps: int = 10_000
    batch_size: int | None = None
    seed: int = 0
    init_scheme: str = "normal"
    init_scale: float = 0.01
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    z_loss: float = 0.0
    logit_softcap: float | None = None
    eval_every: int = 100
    checkpoint_every: int | None = None
    devices: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        if any(h <= 0 for h in self.hidden):
            raise ValueError(
                f"hidden={self.hidden} must hold positive widths; use hidden=() for a linear "
                "softmax classifier."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={self.optimizer!r} is not known; expected one of {', '.join(OPTIMIZERS)}."
            )
        mlp.activation_function(self.activation)
        for name in ("steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.checkpoint_every is None:
            runs = -(-DEFAULT_CHECKPOINT_EVERY // self.eval_every)
            object.__setattr__(self, "checkpoint_every", runs * self.eval_every)
        if self.devices is not None and self.devices <= 0:
            raise ValueError(
                f"devices={self.devices} must be a positive number of devices, or None for all "
                "local devices."
            )
        if self.batch_size is not None and self.batch_size <= 0:
            raise ValueError(
                f"batch_size={self.batch_size} must be positive, or None for full batch."
            )
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                f"eval_every={self.eval_every} (checkpoints are written between compiled runs)."
            )

    def loss_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxsoftmax.mlp.loss` this config fixes."""
        return {
            "l2": self.l2,
            "activation": self.activation,
            "label_smoothing": self.label_smoothing,
            "class_weights": None
            if self.class_weights is None
            else jnp.asarray(self.class_weights),
            "z_loss": self.z_loss,
            "logit_softcap": self.logit_softcap,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      params: the final parameters.
      history: one dict per compiled run (and one for step 0): ``step``, ``batch_loss`` (mean of
        the run's per-step minibatch objectives), ``train_loss``, ``train_accuracy``,
        ``test_loss``, ``test_accuracy`` (losses include the L2 term).
      final_loss: the objective on the whole training split at the final parameters.
      train_accuracy, test_accuracy: at the final parameters.
      steps: the number of steps taken in total.
      train_seconds: wall time of this call, compilation included.
      resumed_from: the step of the checkpoint this call continued from, or ``None``.
      devices: the number of devices the steps ran on, data-parallel (of every process).
      processes: the number of processes they belong to (``jax.process_count()``).
    """

    params: mlp.Params
    history: list[dict[str, float]]
    final_loss: float
    train_accuracy: float
    test_accuracy: float
    steps: int
    train_seconds: float
    resumed_from: int | None
    devices: int
    processes: int = 1

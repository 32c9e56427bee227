"""Training the transformer of ``transformer.py`` on the token streams of ``text_corpus.py``.

The structure of :mod:`jaxsoftmax.training`, for a language model:

- :func:`make_train_step`: one AdamW step on one batch of token windows ``[B, T + 1]``:
  the inputs are the first ``T`` tokens of each window, the labels the last ``T``, and the
  loss is the mean next-token cross-entropy plus the z-loss, with its companions (accuracy,
  z-loss, entropy) from the same pass (``return_aux=True``).
- :func:`make_step`: that step compiled with the choice of its batch: the windows of step
  ``s`` start at offsets drawn from ``fold_in(fold_in(key(seed), 1), s)``, so nothing depends
  on how the steps were split between runs or on the device count. One step is long enough
  (a tenth of a second and more) that calling it from Python costs nothing measurable, and
  the program that trains is the one whose memory the report gives.
- :func:`train`: ``eval_every`` steps at a time, an evaluation on fixed windows of both splits
  after each, atomic checkpoints and ``resume`` (a resumed run ends bit for bit where an
  uninterrupted one does, on the CPU), a stop on a non-finite loss.

The loss (``config.loss``):

- ``"fused"``: ``jaxsoftmax.linear_cross_entropy(hidden, classifier, labels, ...)``: the
  ``[B T, V]`` logits never exist.
- ``"naive"``: ``logits = hidden @ classifier.T``, then ``jaxsoftmax.cross_entropy``: the
  logits and their gradient are ``[B T, V]`` arrays.
- ``vocab_shards > 1`` (fused only): ``jaxsoftmax.sharded_linear_cross_entropy`` with the
  classifier's rows split over the mesh axis ``"vocab"``; the classifier (the embedding table
  when tied) and its optimizer state are stored split the same way.

Devices: a mesh of ``devices / vocab_shards`` x ``vocab_shards`` local devices, axes
``("batch", "vocab")``. Each step's windows are split over ``"batch"`` (data parallel: the
gradient is the mean over all of them, as on one device, up to float rounding); the other
parameters are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformer
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxsoftmax
from jaxsoftmax import training
from jaxsoftmax.training import TrainState, checkpoints

LOSSES = ("fused", "naive")
METRICS = ("loss", "accuracy", "z_loss", "entropy")  # of summarise
BATCH_AXIS, VOCAB_AXIS = "batch", "vocab"
CHECKPOINT_FILENAME = training.CHECKPOINT_FILENAME
# Where language_model.py writes the model by default, and distill.py and gradient_filter.py
# look for it: relative to the folder the scripts run from, as every script's --out.
DEFAULT_RUN = os.path.join("runs", "language_model")
# Settings that change only how the same run is computed (rounding, speed, memory): a
# checkpoint may be resumed with other values.
NOT_HYPERPARAMETERS = ("devices", "vocab_shards", "loss", "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Every setting of a language-model run. The defaults train in about five minutes on a
    2-core CPU; the model flags of ``language_model.py`` scale it up.

    Attributes:
      vocab_size: the byte-pair encoding's vocabulary (the classifier's classes).
      max_files: use only the first ``max_files`` files of the corpus (None: all).
      validation_fraction: the share of files held out for validation.
      d_model, num_layers, num_heads, d_ff: the transformer (``d_ff`` None: ``4 * d_model``).
      seq_len: tokens per window (the context length).
      batch_size: windows per step, ``batch_size * seq_len`` tokens.
      tied: the classifier is the embedding table (else a ``[V, d]`` matrix of its own).
      loss: ``"fused"`` or ``"naive"`` (see the module docstring).
      z_loss: the weight of PaLM's z-loss, ``z_loss * logsumexp(logits)^2`` per token.
      learning_rate, warmup_steps, weight_decay, clip_norm: AdamW (``b2 = 0.95``) with a
        linear warm-up to ``learning_rate`` and a cosine decay to a tenth of it at ``steps``;
        weight decay on the matrices only; gradients clipped to global norm ``clip_norm``.
      steps: the total number of optimizer steps.
      seed: initialisation and window offsets derive from it.
      eval_every: steps between evaluations; one history row each.
      eval_batches: the evaluation reads ``eval_batches * batch_size`` fixed windows of each
        split, evenly spaced over it.
      checkpoint_every: steps between checkpoints, a multiple of ``eval_every``; 0 writes none.
      devices: local devices to run on (None: all); ``vocab_shards`` of them split the
        classifier, the rest of the factor splits the batch.
    """

    vocab_size: int = 16384
    max_files: int | None = None
    validation_fraction: float = 0.05
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int | None = None
    seq_len: int = 128
    batch_size: int = 16
    tied: bool = True
    loss: str = "fused"
    z_loss: float = 1e-4
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    steps: int = 500
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    devices: int | None = None
    vocab_shards: int = 1

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not known; expected one of {LOSSES}.")
        positive = (
            "vocab_size d_model num_layers num_heads seq_len batch_size steps eval_every "
            "eval_batches vocab_shards"
        )
        for name in positive.split():
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide d_model={self.d_model} (each head "
                "gets d_model / num_heads dimensions)."
            )
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                f"eval_every={self.eval_every} (checkpoints are written after evaluations)."
            )
        if self.vocab_shards > 1 and self.loss != "fused":
            raise ValueError(
                f"vocab_shards={self.vocab_shards} splits the fused loss's classifier; "
                f"loss={self.loss!r} builds whole logits. Use loss='fused' or vocab_shards=1."
            )
        if self.devices is not None and self.devices % self.vocab_shards:
            raise ValueError(
                f"vocab_shards={self.vocab_shards} must divide devices={self.devices}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def peak_memory_bytes() -> int:
    """The process's peak resident memory so far (``getrusage``'s ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)  # bytes on macOS


# ---------------------------------------------------------------------------------------------
# Devices


def make_mesh(config: LMConfig) -> Mesh:
    """``("batch", "vocab")`` over the first ``config.devices`` local devices."""
    devices = training.select_devices(config.devices)
    if len(devices) % config.vocab_shards:
        raise ValueError(
            f"vocab_shards={config.vocab_shards} must divide the {len(devices)} devices used."
        )
    grid = np.array(devices).reshape(len(devices) // config.vocab_shards, config.vocab_shards)
    return Mesh(grid, (BATCH_AXIS, VOCAB_AXIS))


def _classifier_key(config: LMConfig) -> str:
    return "embedding" if config.tied else "classifier"


def param_shardings(config: LMConfig, mesh: Mesh, params: Any) -> Any:
    """Every parameter replicated, the classifier's rows split over ``"vocab"``."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, params)
    shardings[_classifier_key(config)] = NamedSharding(mesh, PartitionSpec(VOCAB_AXIS, None))
    return shardings


def state_shardings(config: LMConfig, mesh: Mesh, state: TrainState, optimizer) -> TrainState:
    """The layout of a :class:`TrainState`: the optimizer's moments follow their parameters."""
    params = param_shardings(config, mesh, state.params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        state.opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(params, opt_state, replicated)


# ---------------------------------------------------------------------------------------------
# Model, optimizer, loss


def make_optimizer(config: LMConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, config.steps - 1),
        decay_steps=config.steps,
        end_value=config.learning_rate / 10,
    )
    matrices = lambda params: jax.tree.map(lambda p: p.ndim == 2, params)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b2=0.95, weight_decay=config.weight_decay, mask=matrices),
    )


def init_params(config: LMConfig, vocab_size: int):
    return transformer.init(
        jax.random.fold_in(jax.random.key(config.seed), 0),
        vocab_size=vocab_size,
        d_model=config.d_model,
        num_layers=config.num_layers,
        max_len=config.seq_len,
        d_ff=config.d_ff,
        tied=config.tied,
    )


def token_loss(
    config: LMConfig, hidden: jax.Array, classifier: jax.Array, labels: jax.Array, mesh=None
) -> tuple[jax.Array, jaxsoftmax.LossAux]:
    """``(mean loss, aux)`` of next-token labels ``[B, T]`` from the final states
    ``[B, T, d]`` and the classifier ``[V, d]``, computed as ``config.loss`` says."""
    if config.loss == "naive":
        logits = hidden @ classifier.T
        return jaxsoftmax.cross_entropy(logits, labels, z_loss=config.z_loss, return_aux=True)
    if config.vocab_shards > 1:
        return jaxsoftmax.sharded_linear_cross_entropy(
            hidden,
            classifier,
            labels,
            mesh=mesh,
            class_axis_name=VOCAB_AXIS,
            batch_axis_name=BATCH_AXIS,
            z_loss=config.z_loss,
            return_aux=True,
        )
    return jaxsoftmax.linear_cross_entropy(
        hidden, classifier, labels, z_loss=config.z_loss, return_aux=True
    )


def objective(config: LMConfig, params, windows: jax.Array, mesh=None):
    """The training objective on token windows ``[B, T + 1]`` and the per-token aux."""
    inputs, labels = windows[:, :-1], windows[:, 1:]
    hidden = transformer.hidden_states(params, inputs, num_heads=config.num_heads)
    return token_loss(config, hidden, transformer.classifier(params), labels, mesh)


def summarise(loss: jax.Array, aux) -> dict[str, jax.Array]:
    """Means over the tokens: ``loss`` the cross-entropy alone (the objective less the z-loss
    term), ``accuracy`` of the argmax, ``z_loss``, ``entropy`` of the predicted distribution."""
    z_loss = jnp.mean(aux.z_loss)
    return {
        "loss": loss - z_loss,
        "accuracy": jnp.mean(aux.correct.astype(jnp.float32)),
        "z_loss": z_loss,
        "entropy": jnp.mean(aux.entropy),
    }


# ---------------------------------------------------------------------------------------------
# Steps


def window_starts(config: LMConfig, num_tokens: int, step: jax.Array) -> jax.Array:
    """The offsets ``[B]`` of step ``step``'s windows in a stream of ``num_tokens`` tokens."""
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    return jax.random.randint(
        jax.random.fold_in(data_key, step),
        (config.batch_size,),
        0,
        num_tokens - config.seq_len,
    )


def gather_windows(tokens: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    """``[len(starts), length]``: ``tokens[s : s + length]`` for each start ``s``."""
    return jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (length,)))(starts)


def make_train_step(config: LMConfig, optimizer, mesh=None) -> Callable:
    """``(state, windows [B, T + 1]) -> (state, metrics)``, metrics of the batch before the
    update (:func:`summarise`)."""

    def train_step(state: TrainState, windows: jax.Array):
        (loss, aux), grads = jax.value_and_grad(
            lambda p: objective(config, p, windows, mesh), has_aux=True
        )(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), summarise(loss, aux)

    return train_step


def _split_batch(mesh, windows):
    if mesh is None:
        return windows
    return jax.lax.with_sharding_constraint(
        windows, NamedSharding(mesh, PartitionSpec(BATCH_AXIS, None))
    )


def make_step(config: LMConfig, optimizer, mesh=None, shardings=None) -> Callable:
    """A jitted ``(state, train_tokens) -> (state, metrics)``: step ``state.step`` on its own
    windows of the training stream. ``state`` is donated: its buffers hold the new state."""
    train_step = make_train_step(config, optimizer, mesh)

    def step(state: TrainState, tokens: jax.Array):
        starts = window_starts(config, tokens.shape[0], state.step)
        windows = gather_windows(tokens, starts, config.seq_len + 1)
        return train_step(state, _split_batch(mesh, windows))

    return jax.jit(step, out_shardings=(shardings, None), donate_argnums=0)


def evaluation_windows(config: LMConfig, tokens: np.ndarray) -> np.ndarray:
    """``[eval_batches, batch_size, seq_len + 1]`` windows evenly spaced over ``tokens``."""
    count = config.eval_batches * config.batch_size
    starts = np.linspace(0, tokens.size - config.seq_len - 1, count).astype(np.int64)
    windows = tokens[starts[:, None] + np.arange(config.seq_len + 1)]
    return windows.reshape(config.eval_batches, config.batch_size, config.seq_len + 1)


def make_evaluate(config: LMConfig, mesh=None) -> Callable:
    """A jitted ``(params, windows [E, B, T + 1]) -> metrics``: the means of
    :func:`summarise` over the ``E`` batches, one batch at a time (the naive loss's logits
    are never larger than in training)."""

    def evaluate(params, windows):
        def body(total, batch):
            loss, aux = objective(config, params, _split_batch(mesh, batch), mesh)
            metrics = summarise(loss, aux)
            return jax.tree.map(jnp.add, total, metrics), None

        zeros = {key: jnp.zeros((), jnp.float32) for key in METRICS}
        total, _ = jax.lax.scan(body, zeros, windows)
        return jax.tree.map(lambda t: t / windows.shape[0], total)

    return jax.jit(evaluate)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    path: str, state: TrainState, history: list[dict], config: LMConfig, fingerprint: str
) -> None:
    """Parameters, optimizer state, step, history, config and the corpus's fingerprint, as one
    ``.npz``, written atomically."""
    config_text = json.dumps(config.to_dict())
    checkpoints.save_state(path, state, history, config=config_text, corpus=fingerprint)


def check_checkpoint(path: str, config: LMConfig, fingerprint: str) -> int:
    """The step of the checkpoint at ``path``, or ``ValueError`` saying why it cannot be
    resumed with ``config`` on the corpus of ``fingerprint``. Reads no parameters."""
    stored = checkpoints.read_fields(path, ("config", "corpus", "step"))
    saved = json.loads(str(stored["config"]))
    checkpoints.check_same_settings(path, saved, config.to_dict(), NOT_HYPERPARAMETERS)
    if str(stored["corpus"]) != fingerprint:
        raise ValueError(
            f"the checkpoint {path} was trained on other tokens (another Python's standard "
            "library, or another tokenizer); resume where it was written, or start afresh."
        )
    return int(stored["step"])


def train_command(folder: str) -> str:
    """The command that trains the language model into ``folder``."""
    command = "python experiments/language_model.py"
    if os.path.abspath(folder) != os.path.abspath(DEFAULT_RUN):
        command += f" --out {folder}"
    return command


def trained_checkpoint(folder: str, role: str = "the model") -> str:
    """The checkpoint of the language model trained into ``folder``, or ``FileNotFoundError``
    with the command that trains it (``role``: what the caller calls the model)."""
    path = os.path.join(folder, CHECKPOINT_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no trained language model at {path}; train {role} first with "
            f"`{train_command(folder)}` (about 5 minutes on 2 CPU cores)"
        )
    return path


def read_trained(folder: str, role: str = "the model") -> tuple[LMConfig, str, str]:
    """``(config, corpus fingerprint, file fingerprint)`` of the language model trained into
    ``folder``; reads no parameters. ``FileNotFoundError`` or ``ValueError`` saying how to
    train it (``role``: what the caller calls the model)."""
    path = trained_checkpoint(folder, role)
    try:
        with open(path, "rb") as file:
            payload = file.read()
        with np.load(path, allow_pickle=False) as stored:
            config = LMConfig(**json.loads(str(stored["config"])))
            corpus = str(stored["corpus"])
    except (OSError, KeyError, ValueError, TypeError) as error:
        possessive = role.removeprefix("the ")
        raise ValueError(
            f"the {possessive}'s checkpoint {path} cannot be read ({type(error).__name__}: "
            f"{error}); train it again with {train_command(folder)}"
        ) from None
    return config, corpus, hashlib.sha256(payload).hexdigest()


def load_params(path: str, config: LMConfig, vocab_size: int):
    """The parameters of the checkpoint at ``path``, written by a run of ``config``, placed on
    the default device."""
    optimizer = make_optimizer(config)
    params = jax.eval_shape(lambda: init_params(config, vocab_size))
    template = TrainState(params, jax.eval_shape(optimizer.init, params), 0)
    state, _ = load_checkpoint(path, template)
    return jax.device_put(state.params)


def load_checkpoint(path: str, template: TrainState) -> tuple[TrainState, list[dict]]:
    """The state (NumPy arrays, in the structure of ``template``) and history at ``path``."""
    with np.load(path, allow_pickle=False) as stored:
        return checkpoints.read_state(stored, template)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class LMResult:
    """What :func:`train` returns.

    Attributes:
      params: the final parameters.
      history: one row per evaluation (the first at step 0); see :func:`train`.
      steps: steps taken in total; resumed_from: the checkpoint's step, or None.
      tokens_per_second: training tokens over the wall time of the training steps (those
        before a resume included; no compilation, no evaluation).
      step_temp_bytes: the compiled training step's temporary memory
        (``memory_analysis().temp_size_in_bytes``).
      peak_memory_bytes: the process's peak resident memory at the end.
      train_seconds: the wall time of this call, compilation and evaluation included.
      devices: the mesh's shape, ``{"batch": ..., "vocab": ...}``.
    """

    params: Any
    history: list[dict]
    steps: int
    resumed_from: int | None
    tokens_per_second: float
    step_temp_bytes: int
    peak_memory_bytes: int
    train_seconds: float
    devices: dict[str, int]


class NonFiniteLossError(training.NonFiniteLossError):
    """The loss or the parameters became NaN or infinite; the run was stopped."""


@functools.lru_cache(maxsize=8)
def compiled_functions(config: LMConfig, vocab_size: int):
    """The mesh, optimizer, state layout and jitted functions of ``config``, made once per
    process (tests and comparisons reuse them)."""
    mesh = make_mesh(config)
    optimizer = make_optimizer(config)
    abstract_params = jax.eval_shape(lambda: init_params(config, vocab_size))
    abstract_state = TrainState(
        abstract_params,
        jax.eval_shape(optimizer.init, abstract_params),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    shardings = state_shardings(config, mesh, abstract_state, optimizer)

    def fresh_state():
        params = init_params(config, vocab_size)
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    return {
        "mesh": mesh,
        "optimizer": optimizer,
        "shardings": shardings,
        "abstract_state": abstract_state,
        # Runs once: compiling fast matters more than running fast (as in jaxsoftmax.training).
        "init": jax.jit(
            fresh_state,
            out_shardings=shardings,
            compiler_options=training.RUN_ONCE_COMPILER_OPTIONS,
        ),
        "step": make_step(config, optimizer, mesh, shardings),
        "evaluate": make_evaluate(config, mesh),
        "compiled_steps": {},
    }


def place_tokens(mesh: Mesh, tokens: np.ndarray) -> jax.Array:
    """The training stream as :func:`train` hands it to the step: a copy on every device."""
    return jax.device_put(tokens, NamedSharding(mesh, PartitionSpec()))


def compile_once(functions: dict, key: Any, *arguments: Any):
    """``functions["step"]`` compiled for ``arguments``, once per process for each ``key`` (a
    second run in the same process, a resumed one in a test, reuses it)."""
    if key not in functions["compiled_steps"]:
        functions["compiled_steps"][key] = functions["step"].lower(*arguments).compile()
    return functions["compiled_steps"][key]


def compile_step(functions: dict, state: TrainState, train_tokens: jax.Array):
    """The step of :func:`compiled_functions` compiled for these arguments' shapes and
    layouts, once per process."""
    key = (train_tokens.shape, train_tokens.sharding)
    return compile_once(functions, key, state, train_tokens)


def check_config_for_corpus(config: LMConfig, corpus) -> None:
    """Raises ``ValueError`` naming the setting if ``config`` cannot run on the local devices
    or train on ``corpus``, before anything is compiled. :func:`train` calls it first."""
    mesh = make_mesh(config)
    if config.batch_size % mesh.shape[BATCH_AXIS]:
        raise ValueError(
            f"batch_size={config.batch_size} must divide by the {mesh.shape[BATCH_AXIS]} "
            "devices that split the batch."
        )
    if corpus.vocab_size % config.vocab_shards:
        raise ValueError(
            f"vocab_shards={config.vocab_shards} must divide the vocabulary of "
            f"{corpus.vocab_size} tokens (the classifier is stored split into equal row blocks)."
        )
    shortest = min(corpus.train_tokens.size, corpus.validation_tokens.size)
    if shortest <= config.seq_len + 1:
        raise ValueError(
            f"seq_len={config.seq_len} is too long for the corpus: a split has only "
            f"{shortest} tokens."
        )


def train(
    config: LMConfig,
    corpus,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    on_run_end: Callable[[dict, int], None] | None = None,
) -> LMResult:
    """Trains the transformer on ``corpus`` (from ``text_corpus.load``), through the run loop
    of :func:`jaxsoftmax.training.run_loop` (:func:`run_training`).

    History rows: ``step``, ``tokens`` (trained on so far), ``batch_loss``, ``batch_accuracy``,
    ``batch_z_loss``, ``batch_entropy`` (means over the run's steps, each before its update),
    ``train_*`` and ``validation_*`` (``loss``, ``accuracy``, ``z_loss``, ``entropy`` on the
    fixed evaluation windows), ``run_seconds`` (the wall time of the steps since the last row) and
    ``tokens_per_second`` (of that run). Losses are cross-entropies in nats per token, without
    the z-loss term.
    """
    started = time.perf_counter()
    check_config_for_corpus(config, corpus)
    functions = compiled_functions(config, corpus.vocab_size)
    mesh, shardings = functions["mesh"], functions["shardings"]
    train_tokens = place_tokens(mesh, corpus.train_tokens)
    windows = placed_evaluation_windows(config, corpus, NamedSharding(mesh, PartitionSpec()))
    evaluate = evaluator(functions["evaluate"], windows, METRICS)

    def fresh() -> tuple[TrainState, list[dict]]:
        state = functions["init"]()
        no_step = {f"batch_{name}": None for name in METRICS}
        return state, [first_row(no_step, evaluate(state.params))]

    start = start_run(
        config,
        config,
        corpus,
        functions["abstract_state"],
        fresh,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        shardings=shardings,
    )
    # Compiled before the clock starts; XLA's memory analysis of this program is the report's.
    compiled_step = compile_step(functions, start.state, train_tokens)
    state, history = run_training(
        config,
        start,
        run_steps=steps_one_by_one(compiled_step, train_tokens),
        batch_columns=lambda metrics: {
            f"batch_{name}": float(np.mean(values)) for name, values in metrics.items()
        },
        checked=lambda metrics: [metrics["loss"]],
        evaluate=evaluate,
        on_run_end=on_run_end,
        subject="the training loss or parameters",
        advice=f"Try a smaller learning rate (was {config.learning_rate}).",
    )
    jax.block_until_ready(state.params)
    return LMResult(
        params=state.params,
        history=history,
        steps=int(state.step),
        resumed_from=start.resumed_from,
        tokens_per_second=tokens_per_second(history),
        step_temp_bytes=int(compiled_step.memory_analysis().temp_size_in_bytes),
        peak_memory_bytes=peak_memory_bytes(),
        train_seconds=time.perf_counter() - started,
        devices=dict(mesh.shape),
    )


# ---------------------------------------------------------------------------------------------
# What the language model's training and distillation's share


def placed_evaluation_windows(config: LMConfig, corpus, sharding=None) -> dict[str, jax.Array]:
    """``{"train": windows, "validation": windows}``: :func:`evaluation_windows` of each split,
    placed with ``sharding`` (``None``: the default device)."""
    splits = (("train", corpus.train_tokens), ("validation", corpus.validation_tokens))
    return {
        split: jax.device_put(evaluation_windows(config, tokens), sharding)
        for split, tokens in splits
    }


def evaluator(evaluate: Callable, windows: dict[str, jax.Array], names: tuple[str, ...]):
    """``params -> {f"{split}_{name}": value}``: ``evaluate(params, windows)`` on each split's
    windows, the metrics ``names`` of each as Python floats."""

    def evaluate_splits(params) -> dict[str, float]:
        row = {}
        for split, split_windows in windows.items():
            values = evaluate(params, split_windows)
            row.update({f"{split}_{name}": float(values[name]) for name in names})
        return row

    return evaluate_splits


def first_row(no_step: dict, evaluated: dict) -> dict:
    """The history's row at step 0: no step taken, the evaluation of the initial weights."""
    timing = {"run_seconds": None, "tokens_per_second": None}
    return {"step": 0, "tokens": 0, **no_step, **evaluated, **timing}


def steps_one_by_one(step: Callable, *arguments: Any) -> Callable:
    """``(state, num_steps) -> (state, outputs)``: ``num_steps`` calls of the compiled ``step``
    ``(state, *arguments) -> (state, outputs)``, the outputs stacked on the host. One step is
    long enough (a tenth of a second and more) that calling it from Python costs nothing
    measurable."""

    def run(state: TrainState, num_steps: int):
        outputs = []
        for _ in range(num_steps):
            state, output = step(state, *arguments)
            outputs.append(output)
        return state, jax.tree.map(lambda *values: np.stack(values), *jax.device_get(outputs))

    return run


@dataclasses.dataclass
class Start:
    """Where a run starts (:func:`start_run`): its ``state`` and ``history``, the step of the
    checkpoint it resumed (``resumed_from``, or None) and its checkpoints' ``(path, run
    settings, corpus fingerprint)`` (no checkpoints for a ``None`` path)."""

    state: TrainState
    history: list[dict]
    resumed_from: int | None
    checkpoint: tuple[str | None, Any, str]


def start_run(
    config: LMConfig,
    run_config: Any,
    corpus,
    abstract_state: TrainState,
    fresh: Callable[[], tuple[TrainState, list[dict]]],
    *,
    checkpoint_dir: str | None,
    resume: bool,
    shardings: Any = None,
) -> Start:
    """The run's :class:`Start`: with ``resume``, the checkpoint in ``checkpoint_dir`` (checked
    against ``run_config``, all of the run's settings, and ``corpus``; read in the structure of
    ``abstract_state`` and placed with ``shardings``, None: the default device) where there is
    one, else ``fresh()``. No checkpoints when ``config.checkpoint_every`` is 0."""
    path = training.prepare_checkpoint(checkpoint_dir if config.checkpoint_every else None)

    def load(path: str) -> tuple[TrainState, list[dict]]:
        check_checkpoint(path, run_config, corpus.fingerprint)
        state, history = load_checkpoint(path, abstract_state)
        return jax.device_put(state, shardings), history

    state, history, resumed_from = training.start_or_resume(path, resume, load=load, fresh=fresh)
    return Start(state, history, resumed_from, (path, run_config, corpus.fingerprint))


def run_training(
    config: LMConfig,
    start: Start,
    *,
    batch_columns: Callable[[Any], dict],
    checked: Callable[[Any], Any],
    evaluate: Callable[[Any], dict],
    subject: str,
    **loop: Any,
) -> tuple[TrainState, list[dict]]:
    """:func:`jaxsoftmax.training.run_loop` from ``start`` (:func:`start_run`) to
    ``config.steps`` with a language model's rows: ``step``, ``tokens``,
    ``batch_columns(outputs)``, ``evaluate(params)``, ``run_seconds`` and
    ``tokens_per_second``. A run stops with :class:`NonFiniteLossError` naming ``subject`` when
    an array of ``checked(outputs)`` or a parameter is not finite. Checkpoints:
    :func:`save_checkpoint` of ``start.checkpoint``. ``loop``: ``run_steps``, ``advice`` and
    ``on_run_end`` of ``run_loop``."""
    tokens_per_step = config.batch_size * config.seq_len

    def row(state: TrainState, outputs, seconds: float, length: int) -> dict:
        step = int(state.step)
        return {
            "step": step,
            "tokens": step * tokens_per_step,
            **batch_columns(outputs),
            **evaluate(state.params),
            "run_seconds": seconds,
            "tokens_per_second": length * tokens_per_step / seconds,
        }

    def non_finite(state: TrainState, outputs, first: int, length: int) -> str | None:
        finite = all(np.all(np.isfinite(values)) for values in checked(outputs))
        if finite and training.all_finite(state.params):
            return None
        return f"{subject} became non-finite between steps {first} and {first + length}"

    return run_from(start, config, history_row=row, non_finite=non_finite, **loop)


def run_from(start: Start, config: Any, *, history_row: Callable, non_finite: Callable,
             **loop: Any) -> tuple[TrainState, list[dict]]:  # fmt: skip
    """:func:`jaxsoftmax.training.run_loop` from ``start`` (:func:`start_run`) to
    ``config.steps``, a ``history_row`` every ``config.eval_every`` steps, :func:`save_checkpoint`
    of ``start.checkpoint`` every ``config.checkpoint_every``, and
    :class:`NonFiniteLossError` when ``non_finite`` says so. ``loop``: ``run_steps``,
    ``advice`` and ``on_run_end`` of ``run_loop``. The language model's training
    (:func:`run_training`) and the scripts that tune it run through it."""
    checkpoint_path, run_config, fingerprint = start.checkpoint
    return training.run_loop(
        start.state,
        start.history,
        steps=config.steps,
        eval_every=config.eval_every,
        history_row=history_row,
        non_finite=non_finite,
        error=NonFiniteLossError,
        checkpoint_every=config.checkpoint_every,
        save=None
        if checkpoint_path is None
        else lambda state, history: save_checkpoint(
            checkpoint_path, state, history, run_config, fingerprint
        ),
        checkpoint_path=checkpoint_path,
        last_checkpoint=start.resumed_from,
        **loop,
    )


def loss_or_parameters_non_finite(state: TrainState, outputs: dict, first: int,
                                  length: int) -> str | None:  # fmt: skip
    """``run_loop``'s ``non_finite`` for runs whose outputs hold a per-step ``"loss"``."""
    if training.all_finite(state.params) and np.all(np.isfinite(outputs["loss"])):
        return None
    return (
        f"the loss or the parameters became non-finite between steps {first} and {first + length}"
    )


def tokens_per_second(history: list[dict]) -> float:
    """Training tokens over the wall time of the training steps of every row."""
    seconds = sum(row["run_seconds"] or 0.0 for row in history)
    return history[-1]["tokens"] / seconds if seconds else 0.0

"""Tuning the language model of ``language_model.py`` with DPO on the pairs of
``preference_pairs.py``: the library behind ``preference.py``.

The policy starts as the language model and the reference is the same model, frozen. A batch
holds the ``2 B`` responses of ``B`` pairs, chosen and rejected interleaved (rows ``2i`` and
``2i + 1``: ``layout="interleaved"``), each row the prompt followed by the response but its
last token; the hidden states of positions ``P - 1 .. P + N - 2`` predict the response's
``N`` tokens (``sampling.completion_states``). One step is one Adam step on the loss of
``loss_type`` (DPO's ``"sigmoid"`` by default) over the summed log-probabilities of each
response under the policy and the reference.

The loss (``loss``):

- ``"fused"``: ``jaxsoftmax.linear_preference_loss(hidden, classifier, tokens, mask=mask,
  layout="interleaved", reference=(ref_hidden, ref_classifier), ...)``: the policy's and the
  reference's token log-probabilities from their hidden states, neither model's
  ``[tokens, V]`` logits built, the reference's without a backward pass;
- ``"naive"``: each model's logits ``hidden @ classifier.T``, then
  ``jaxsoftmax.token_log_probs``, ``sequence_log_probs``, ``preference_pairs`` and
  ``preference_loss`` with the reference's sequence log-probabilities.

:func:`train` runs the loop of :func:`jaxsoftmax.training.run_loop` (held-out evaluations,
checkpoints, resume) through ``lm_training.start_run``; :func:`compare_losses` measures both
updates' memory and time.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import grpo_training
import harness
import jax
import jax.numpy as jnp
import lm_training
import numpy as np
import optax
import preference_pairs
import sampling
import text_corpus
import transformer

import jaxsoftmax
from jaxsoftmax import training
from jaxsoftmax.training import TrainState

LOSSES = ("fused", "naive")
# The loss types of jaxsoftmax.preference_loss that compare the policy with a reference.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
TRAINING_COLUMNS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Every setting of a run.

    Attributes:
      model: the language model's settings, as its checkpoint records them.
      model_fingerprint: SHA-256 of its checkpoint file: a run never resumes on another model.
      loss: ``"fused"`` or ``"naive"``: how the log-probabilities are computed.
      loss_type, beta, label_smoothing: the arguments of ``jaxsoftmax.preference_loss``.
      rejected: ``"sample"``, ``"shuffled"`` or ``"mix"`` (``preference_pairs.py``).
      sample_temperature: the temperature of the model's samples (the rejected responses).
      steps: Adam steps, each on ``pairs_per_step`` training pairs.
      prompt_tokens, response_tokens: ``P`` and ``N``, tokens per prompt and per response.
      learning_rate, clip_norm: Adam's constant step size; gradients clipped to this norm.
      train_pairs, eval_pairs: pairs cut from the training and the validation files.
      seed: the pairs, their order and the samples derive from it.
      eval_every, checkpoint_every: steps between held-out evaluations and checkpoints.
    """

    model: lm_training.LMConfig
    model_fingerprint: str
    loss: str = "fused"
    loss_type: str = "sigmoid"
    beta: float = 0.5
    label_smoothing: float = 0.0
    rejected: str = "sample"
    sample_temperature: float = 1.0
    steps: int = 256
    pairs_per_step: int = 16
    prompt_tokens: int = 32
    response_tokens: int = 16
    learning_rate: float = 1e-4
    clip_norm: float = 1.0
    train_pairs: int = 2048
    eval_pairs: int = 256
    seed: int = 0
    eval_every: int = 32
    checkpoint_every: int = 32

    def __post_init__(self) -> None:
        for name, known in (
            ("loss", LOSSES),
            ("loss_type", LOSS_TYPES),
            ("rejected", preference_pairs.REJECTED),
        ):
            if getattr(self, name) not in known:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not known; expected one of {known}."
                )
        if self.prompt_tokens + self.response_tokens - 1 > self.model.seq_len:
            raise ValueError(
                f"response_tokens={self.response_tokens} after prompt_tokens="
                f"{self.prompt_tokens} make sequences of "
                f"{self.prompt_tokens + self.response_tokens - 1} tokens; the model reads at "
                f"most {self.model.seq_len} (its position table)."
            )
        if self.response_tokens < 2:
            raise ValueError(
                f"response_tokens={self.response_tokens} must be at least 2 (a shuffled "
                "response must differ from the true one)."
            )
        for name in ("train_pairs", "eval_pairs"):
            if getattr(self, name) % self.pairs_per_step:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be a multiple of "
                    f"pairs_per_step={self.pairs_per_step} (a batch at a time)."
                )
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                f"eval_every={self.eval_every} (checkpoints are written after evaluations)."
            )
        if self.loss_type == "robust" and self.label_smoothing >= 0.5:
            raise ValueError(
                f"label_smoothing={self.label_smoothing} must be below 0.5 for the robust "
                "loss (it divides by 1 - 2 label_smoothing)."
            )

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``jaxsoftmax.preference_loss``."""
        return {
            "loss_type": self.loss_type,
            "beta": self.beta,
            "label_smoothing": self.label_smoothing,
        }

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {**fields, "model": self.model.to_dict()}


# ---------------------------------------------------------------------------------------------
# Pairs and batches


class PairSets(NamedTuple):
    """The training pairs (from the training files) and the held-out ones (validation files),
    with the tokenizer that decodes them (``tokenizers.Tokenizer``)."""

    train: preference_pairs.Pairs
    held_out: preference_pairs.Pairs
    tokenizer: Any


def make_pairs(config: PreferenceConfig, corpus, params) -> PairSets:
    """The pairs of ``config`` cut from ``corpus`` (``text_corpus.load``), the rejected
    responses sampled from ``params`` (the model the run starts from)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(corpus.tokenizer_path)
    sample = functools.partial(
        preference_pairs.own_samples,
        params,
        num_heads=config.model.num_heads,
        response_tokens=config.response_tokens,
        temperature=config.sample_temperature,
    )
    cut = functools.partial(
        preference_pairs.make_pairs,
        prompt_tokens=config.prompt_tokens,
        response_tokens=config.response_tokens,
        rejected=config.rejected,
        end_of_text=tokenizer.token_to_id(text_corpus.END_OF_TEXT),
        sample=sample,
    )
    return PairSets(
        train=cut(corpus.train_tokens, count=config.train_pairs, seed=config.seed),
        held_out=cut(corpus.validation_tokens, count=config.eval_pairs, seed=config.seed + 10),
        tokenizer=tokenizer,
    )


class Batch(NamedTuple):
    """``B`` pairs as the loss reads them: ``2 B`` rows, chosen and rejected interleaved."""

    inputs: jax.Array  # int32 [2B, P + N - 1]: the prompt, then the response but its last token
    tokens: jax.Array  # int32 [2B, N]: the response
    mask: jax.Array  # bool [2B, N]: every token counts (responses of equal length)


def pair_batch(pairs: preference_pairs.Pairs, indices: np.ndarray) -> Batch:
    """The :class:`Batch` of the pairs ``indices``."""
    prompts = np.repeat(pairs.prompts[indices], 2, axis=0)
    responses = np.stack([pairs.chosen[indices], pairs.rejected[indices]], axis=1)
    responses = responses.reshape(prompts.shape[0], -1)
    inputs = np.concatenate([prompts, responses[:, :-1]], axis=1)
    return Batch(jnp.asarray(inputs), jnp.asarray(responses), jnp.ones(responses.shape, bool))


def step_pairs(config: PreferenceConfig, step: int) -> np.ndarray:
    """The indices of step ``step``'s training pairs: each epoch goes through all of them in
    an order drawn from ``(seed, epoch)``, so a resumed run takes what an uninterrupted one
    would."""
    per_epoch = config.train_pairs // config.pairs_per_step
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, 4, epoch]).permutation(config.train_pairs)
    return order[position * config.pairs_per_step : (position + 1) * config.pairs_per_step]


# ---------------------------------------------------------------------------------------------
# The loss and the update


def response_states(config: PreferenceConfig, params, inputs: jax.Array) -> jax.Array:
    """``[2B, N, d]``: the hidden states that predict the responses' tokens."""
    hidden = transformer.hidden_states(params, inputs, num_heads=config.model.num_heads)
    return sampling.completion_states(hidden, config.prompt_tokens)


def sequence_scores(hidden, classifier, batch: Batch, loss: str):
    """``(chosen, rejected)``, the ``jaxsoftmax.SequenceLogProbs`` ``[B]`` of the batch's
    responses under ``softmax(hidden classifier^T)``, computed as ``loss`` says."""
    if loss == "fused":
        log_p = jaxsoftmax.linear_token_log_probs(
            hidden, classifier, batch.tokens, where=batch.mask
        )
    else:
        log_p = jaxsoftmax.token_log_probs(hidden @ classifier.T, batch.tokens, where=batch.mask)
    sequences = jaxsoftmax.sequence_log_probs(log_p, mask=batch.mask)
    return jaxsoftmax.preference_pairs(sequences, "interleaved")


def states_objective(
    config: PreferenceConfig, loss: str, hidden, classifier, ref_hidden, ref_classifier,
    batch: Batch,
):  # fmt: skip
    """``(loss, jaxsoftmax.PreferenceMetrics)`` from the policy's response states ``hidden``
    ``[2B, N, d]`` and ``classifier`` ``[V, d]`` and the frozen reference's, as ``loss``
    says."""
    if loss == "fused":
        return jaxsoftmax.linear_preference_loss(
            hidden, classifier, batch.tokens, mask=batch.mask, layout="interleaved",
            reference=(ref_hidden, ref_classifier), **config.options(),
        )  # fmt: skip
    chosen, rejected = sequence_scores(hidden, classifier, batch, loss)
    frozen = jax.lax.stop_gradient((ref_hidden, ref_classifier))
    ref_chosen, ref_rejected = sequence_scores(*frozen, batch, loss)
    return jaxsoftmax.preference_loss(
        chosen, rejected, reference_chosen=ref_chosen, reference_rejected=ref_rejected,
        **config.options(),
    )  # fmt: skip


def objective(config: PreferenceConfig, loss: str, params, ref_params, batch: Batch):
    """:func:`states_objective` of the policy ``params`` against the frozen reference
    ``ref_params`` on ``batch``."""
    return states_objective(
        config, loss,
        response_states(config, params, batch.inputs), transformer.classifier(params),
        response_states(config, ref_params, batch.inputs), transformer.classifier(ref_params),
        batch,
    )  # fmt: skip


def metrics_dict(loss_value, metrics) -> dict:
    """The loss and the fields of ``jaxsoftmax.PreferenceMetrics`` that the loss type sets."""
    fields = {name: value for name, value in metrics._asdict().items() if value is not None}
    return {"loss": loss_value, **fields}


def make_update(config: PreferenceConfig, optimizer, loss: str) -> Callable:
    """A jitted ``(state, ref_params, batch) -> (state, metrics)``: one optimizer step
    (:func:`metrics_dict` of the batch before it)."""

    def update(state: TrainState, ref_params, batch: Batch):
        (value, metrics), grads = jax.value_and_grad(
            functools.partial(objective, config, loss), has_aux=True
        )(state.params, ref_params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), metrics_dict(value, metrics)

    return jax.jit(update)


def abstract_batch(config: PreferenceConfig) -> Batch:
    rows = 2 * config.pairs_per_step
    return Batch(
        jax.ShapeDtypeStruct((rows, config.prompt_tokens + config.response_tokens - 1), jnp.int32),
        jax.ShapeDtypeStruct((rows, config.response_tokens), jnp.int32),
        jax.ShapeDtypeStruct((rows, config.response_tokens), bool),
    )


@functools.lru_cache(maxsize=4)
def compiled_functions(config: PreferenceConfig) -> dict:
    """The optimizer and the programs of ``config``, compiled once per process for the run's
    shapes, before any clock starts: ``init`` (grpo_training.initial_state), ``update``
    (:func:`make_update` with ``config.loss``), ``scores`` (``(params, batch) -> (chosen,
    rejected)``, fused: the held-out evaluation's), ``heldout_metrics`` (the loss and metrics
    of all held-out pairs from their sequence log-probabilities) and ``evaluate_model`` (the
    language model's next-token loss)."""
    optimizer = grpo_training.make_optimizer(config)
    params = jax.eval_shape(lambda: lm_training.init_params(config.model, config.model.vocab_size))
    init = jax.jit(
        functools.partial(grpo_training.initial_state, optimizer),
        compiler_options=training.RUN_ONCE_COMPILER_OPTIONS,
    )
    state = jax.eval_shape(init, params)
    batch = abstract_batch(config)

    def scores(params, batch):
        hidden = response_states(config, params, batch.inputs)
        return sequence_scores(hidden, transformer.classifier(params), batch, "fused")

    def heldout_metrics(chosen, rejected, ref_chosen, ref_rejected):
        return jaxsoftmax.preference_loss(
            chosen, rejected, reference_chosen=ref_chosen, reference_rejected=ref_rejected,
            **config.options(),
        )  # fmt: skip

    return {
        "optimizer": optimizer,
        "init": init,
        "update": make_update(config, optimizer, config.loss).lower(state, params, batch).compile(),
        "scores": jax.jit(scores).lower(params, batch).compile(),
        "heldout_metrics": jax.jit(heldout_metrics),
        "evaluate_model": lm_training.make_evaluate(config.model),
    }


# ---------------------------------------------------------------------------------------------
# Evaluation


def all_scores(config: PreferenceConfig, functions: dict, pairs, params):
    """``(chosen, rejected)`` SequenceLogProbs of all ``pairs`` (NumPy), a batch at a time."""
    pieces = [
        functions["scores"](params, pair_batch(pairs, np.arange(first, first + size)))
        for first, size in _chunks(len(pairs), config.pairs_per_step)
    ]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *jax.device_get(pieces))


def _chunks(count: int, size: int):
    return [(first, size) for first in range(0, count, size)]


def pair_rewards(config: PreferenceConfig, scores, reference) -> np.ndarray:
    """float64 ``[n]``: each pair's reward margin ``beta ((pi_c - r_c) - (pi_r - r_r))``, on
    the sums (the means for ``"ipo"``), as ``jaxsoftmax.preference_loss`` rewards them."""
    value = (lambda s: s.mean) if config.loss_type == "ipo" else (lambda s: s.total)
    (chosen, rejected), (ref_chosen, ref_rejected) = scores, reference
    as64 = lambda s: np.asarray(value(s), np.float64)
    return config.beta * ((as64(chosen) - as64(ref_chosen)) - (as64(rejected) - as64(ref_rejected)))


def evaluator(config: PreferenceConfig, functions: dict, held_out, ref_params, corpus):
    """``params -> row``: on the held-out pairs, ``heldout_loss`` and the metrics of
    ``jaxsoftmax.preference_loss`` (``heldout_reward_accuracy``: the share of pairs whose
    chosen response earns the larger reward; ``heldout_reward_margin``, ``heldout_chosen_reward``,
    ``heldout_rejected_reward``: means), ``heldout_preference_accuracy`` (the share of pairs
    the policy itself gives the chosen response the larger log-probability: the reference's
    before training), ``heldout_chosen_nll`` and ``heldout_rejected_nll`` (the policy's
    negative log-likelihood per response token); and ``validation_loss``, the language model's
    next-token loss on the fixed validation windows of ``language_model.py``. The reference's
    sequence log-probabilities are computed once."""
    windows = lm_training.placed_evaluation_windows(config.model, corpus)
    validation = lm_training.evaluator(
        functions["evaluate_model"], {"validation": windows["validation"]}, ("loss",)
    )
    reference = all_scores(config, functions, held_out, ref_params)

    def evaluate(params) -> dict:
        chosen, rejected = all_scores(config, functions, held_out, params)
        loss, metrics = functions["heldout_metrics"](chosen, rejected, *reference)
        return {
            "heldout_loss": float(loss),
            "heldout_reward_accuracy": float(metrics.reward_accuracy),
            "heldout_reward_margin": float(metrics.reward_margin),
            "heldout_chosen_reward": float(metrics.chosen_reward),
            "heldout_rejected_reward": float(metrics.rejected_reward),
            "heldout_preference_accuracy": float(np.mean(chosen.total > rejected.total)),
            "heldout_chosen_nll": -float(np.mean(np.asarray(chosen.mean, np.float64))),
            "heldout_rejected_nll": -float(np.mean(np.asarray(rejected.mean, np.float64))),
            **validation(params),
        }

    return evaluate


def examples(config, pairs: PairSets, initial_params, final_params, count: int = 4) -> list:
    """The first ``count`` held-out pairs as text, with each response's log-probability per
    token under the initial and the final policy and the pair's reward margin after."""
    functions = compiled_functions(config)
    held_out = pairs.held_out
    first = np.arange(config.pairs_per_step)
    before = jax.device_get(functions["scores"](initial_params, pair_batch(held_out, first)))
    after = jax.device_get(functions["scores"](final_params, pair_batch(held_out, first)))
    margins = pair_rewards(config, after, before)
    decode = lambda tokens: pairs.tokenizer.decode(np.asarray(tokens).tolist())
    return [
        {
            "prompt_end": decode(held_out.prompts[i])[-120:],
            "chosen": decode(held_out.chosen[i]),
            "rejected": decode(held_out.rejected[i]),
            "rejected_is": "the model's sample" if held_out.sampled[i] else "shuffled",
            "log_prob_per_token_before": {
                "chosen": float(before[0].mean[i]),
                "rejected": float(before[1].mean[i]),
            },
            "log_prob_per_token_after": {
                "chosen": float(after[0].mean[i]),
                "rejected": float(after[1].mean[i]),
            },
            "reward_margin_after": float(margins[i]),
        }  # fmt: skip
        for i in range(min(count, config.pairs_per_step))
    ]


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class PreferenceResult:
    """What :func:`train` returns: the final ``params``, the ``history`` (one row per
    evaluation, the first at step 0), ``steps``, ``resumed_from`` (the checkpoint's step or
    None), ``seconds_per_step`` (the updates alone, steps before a resume included) and
    ``train_seconds`` (this call's wall time, compilation and evaluations included)."""

    params: Any
    history: list[dict]
    steps: int
    resumed_from: int | None
    seconds_per_step: float
    train_seconds: float


def steps_of(config: PreferenceConfig, functions: dict, train_pairs, ref_params) -> Callable:
    """``(state, num_steps) -> (state, outputs)``: that many steps; ``outputs`` per-step lists
    of :data:`TRAINING_COLUMNS`."""

    def run(state: TrainState, num_steps: int):
        outputs = {name: [] for name in TRAINING_COLUMNS}
        for _ in range(num_steps):
            batch = pair_batch(train_pairs, step_pairs(config, int(state.step)))
            state, metrics = functions["update"](state, ref_params, batch)
            metrics = jax.device_get(metrics)
            for name in TRAINING_COLUMNS:
                outputs[name].append(float(metrics[name]))
        return state, outputs

    return run


def history_row(evaluate: Callable) -> Callable:
    """The run loop's ``history_row``: the means over the run's steps (``train_*``, each of
    its batch before its update), the held-out evaluation and the run's seconds."""

    def row(state: TrainState, outputs: dict, seconds: float, length: int) -> dict:
        means = {f"train_{name}": float(np.mean(values)) for name, values in outputs.items()}
        return {"step": int(state.step), **means, **evaluate(state.params), "run_seconds": seconds}

    return row


def train(
    config: PreferenceConfig,
    corpus,
    pairs: PairSets,
    initial_params,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    on_run_end: Callable[[dict, int], None] | None = None,
) -> PreferenceResult:
    """Tunes ``initial_params`` (the language model, also the frozen reference) on the
    training ``pairs``; ``eval_every`` steps at a time, then a held-out evaluation
    (:func:`evaluator`), a checkpoint every ``checkpoint_every`` steps (the policy, its
    optimizer state and the history; a resumed run ends bit for bit where an uninterrupted
    one does, on the CPU), through :func:`jaxsoftmax.training.run_loop`.

    History rows: ``step``; ``train_loss``, ``train_reward_accuracy``, ``train_reward_margin``,
    ``train_chosen_reward`` and ``train_rejected_reward`` (means over the run's steps, each
    batch's before its update); the evaluation's columns; ``run_seconds``.
    """
    started = time.perf_counter()
    functions = compiled_functions(config)
    evaluate = evaluator(config, functions, pairs.held_out, initial_params, corpus)

    def fresh() -> tuple[TrainState, list[dict]]:
        no_step = {f"train_{name}": None for name in TRAINING_COLUMNS}
        row = {"step": 0, **no_step, **evaluate(initial_params), "run_seconds": None}
        return functions["init"](initial_params), [row]

    abstract_state = jax.eval_shape(functions["init"], initial_params)
    start = lm_training.start_run(
        config, config, corpus, abstract_state, fresh, checkpoint_dir=checkpoint_dir,
        resume=resume,
    )  # fmt: skip
    state, history = lm_training.run_from(
        start,
        config,
        run_steps=steps_of(config, functions, pairs.train, initial_params),
        history_row=history_row(evaluate),
        non_finite=lm_training.loss_or_parameters_non_finite,
        advice=f"Try a smaller --lr (was {config.learning_rate}).",
        on_run_end=on_run_end,
    )
    jax.block_until_ready(state.params)
    steps = int(state.step)
    seconds = sum(row["run_seconds"] or 0.0 for row in history)
    return PreferenceResult(
        params=state.params,
        history=history,
        steps=steps,
        resumed_from=start.resumed_from,
        seconds_per_step=seconds / steps if steps else 0.0,
        train_seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# The two paths side by side


def compare_losses(config: PreferenceConfig, pairs: PairSets, params, rounds: int) -> dict:
    """The update of each ``loss`` compiled at the run's shape, on step 0's batch, from
    ``params`` (policy and reference alike): its compiled temporary memory
    (``memory_analysis().temp_size_in_bytes``), its median seconds over ``rounds``
    interleaved rounds (:func:`harness.time_interleaved`; compilation excluded), and the
    largest difference between the two updates' loss and metrics on the same batch one update
    later (the policy then differs from the reference: the rewards are not all 0)."""
    functions = compiled_functions(config)
    batch = pair_batch(pairs.train, step_pairs(config, 0))
    state = functions["init"](params)
    results, compiled = {}, {}
    for loss in LOSSES:
        compiled[loss] = functions["update"]
        if loss != config.loss:
            update = make_update(config, functions["optimizer"], loss)
            compiled[loss] = update.lower(state, params, batch).compile()
        temp_bytes = compiled[loss].memory_analysis().temp_size_in_bytes
        results[loss] = {"step_temp_bytes": int(temp_bytes)}
    calls = {loss: functools.partial(compiled[loss], state, params, batch) for loss in LOSSES}
    seconds = harness.time_interleaved(calls, rounds)
    moved, _ = calls[config.loss]()
    outputs = {loss: jax.device_get(compiled[loss](moved, params, batch)[1]) for loss in LOSSES}
    difference = max(
        abs(float(outputs["fused"][name]) - float(outputs["naive"][name]))
        for name in outputs["fused"]
        if name != "pair_count"
    )
    for loss in LOSSES:
        results[loss]["seconds_per_update"] = seconds[loss]
    classifier = transformer.classifier(params)
    return {
        **results,
        "rounds": rounds,
        "shape": {
            "pairs": config.pairs_per_step,
            "responses": 2 * config.pairs_per_step,
            "prompt_tokens": config.prompt_tokens,
            "response_tokens": config.response_tokens,
            "scored_tokens": 2 * config.pairs_per_step * config.response_tokens,
            "vocab_size": int(classifier.shape[0]),
            "d_model": int(classifier.shape[1]),
        },
        "loss_and_metrics_max_difference": difference,
    }

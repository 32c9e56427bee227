"""Fine-tuning the language model of ``language_model.py`` with GRPO on the task of
``python_lines.py``: the library behind ``reinforce.py``.

One step of GRPO (group relative policy optimization):

1. draw ``prompts_per_step`` training prompts and, for each, ``group_size`` completions from
   the policy at temperature ``T`` (``sampling.py``), recording each token's ``log p_old``;
2. reward each completion (1 if its line parses, else 0) and give it the advantage
   ``A_i = (r_i - mean_g r) / (std_g r + 1e-4)`` over its group ``g`` (the completions of the
   same prompt; ``std`` the population's): better than its siblings is positive, and a group
   whose completions all earn the same has no gradient;
3. score the completions under the frozen initial model (``log p_ref``, for the KL term);
4. take ``updates_per_batch`` Adam steps on ``jaxsoftmax.policy_gradient_loss`` with its
   defaults (GRPO: PPO's clipped ratio per token, each sequence's mean over its tokens, the
   mean over sequences) plus ``kl_coef`` times the k3 estimate of ``KL(policy || initial)`` and
   minus ``entropy_coef`` times the entropy. The first step is on-policy: its ratios are
   exactly 1 when sampler and trainer compute the same bits (:func:`token_scores`).

The policy's log-probabilities (``loss``):

- ``"fused"``: ``jaxsoftmax.linear_token_log_probs(hidden, classifier, tokens, temperature=T,
  batch_invariant=True, return_entropy=True)``: no ``[tokens, V]`` array is built;
- ``"naive"``: ``logits = hidden @ classifier.T``, then ``jaxsoftmax.token_log_probs``.

:func:`train` runs the loop of :func:`jaxsoftmax.training.run_loop` (held-out evaluations,
checkpoints, resume); :func:`compare_losses` measures both updates' memory and time.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import harness
import jax
import jax.numpy as jnp
import lm_training
import numpy as np
import optax
import python_lines
import sampling
import text_corpus
import transformer

import jaxsoftmax
from jaxsoftmax import training
from jaxsoftmax.training import TrainState

LOSSES = ("fused", "naive")
ADVANTAGE_EPSILON = 1e-4  # TRL's: keeps a group of nearly equal rewards from exploding


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Every setting of a run.

    Attributes:
      model: the language model's settings, as its checkpoint records them.
      model_fingerprint: SHA-256 of its checkpoint file: a run never resumes on another model.
      loss: ``"fused"`` or ``"naive"``: how the policy's log-probabilities are computed.
      steps: GRPO steps, each on a freshly sampled batch.
      prompts_per_step, group_size: the batch is ``prompts_per_step * group_size`` completions.
      prompt_tokens: tokens per prompt (the line's beginning and the text before it).
      max_new_tokens: the most tokens a completion may take to end its line.
      temperature: ``T`` of the policy ``softmax(z / T)`` that samples and is trained.
      updates_per_batch: optimizer steps on each sampled batch (PPO's epochs).
      clip_epsilon: PPO's clip of the ratio to ``[1 - eps, 1 + eps]``.
      kl_coef, entropy_coef: weights of the KL penalty and the entropy bonus.
      learning_rate, clip_norm: Adam's constant step size; gradients clipped to this norm.
      train_prompts, eval_prompts: prompts cut from the training and validation splits.
      seed: prompts, their order and the samples derive from it.
      eval_every, checkpoint_every: steps between held-out evaluations and checkpoints.
    """

    model: lm_training.LMConfig
    model_fingerprint: str
    loss: str = "fused"
    steps: int = 150
    prompts_per_step: int = 8
    group_size: int = 8
    prompt_tokens: int = 32
    max_new_tokens: int = 16
    temperature: float = 1.0
    updates_per_batch: int = 2
    clip_epsilon: float = 0.2
    kl_coef: float = 0.1
    entropy_coef: float = 0.0
    learning_rate: float = 3e-4
    clip_norm: float = 1.0
    train_prompts: int = 2048
    eval_prompts: int = 64
    seed: int = 0
    eval_every: int = 15
    checkpoint_every: int = 15

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not known; expected one of {LOSSES}.")
        if self.prompt_tokens + self.max_new_tokens - 1 > self.model.seq_len:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} after prompt_tokens={self.prompt_tokens} "
                f"make sequences of {self.prompt_tokens + self.max_new_tokens - 1} tokens; the "
                f"model reads at most {self.model.seq_len} (its position table)."
            )
        if self.eval_prompts % self.prompts_per_step:
            raise ValueError(
                f"eval_prompts={self.eval_prompts} must be a multiple of "
                f"prompts_per_step={self.prompts_per_step} (evaluated a batch at a time)."
            )
        if self.train_prompts < self.prompts_per_step:
            raise ValueError(
                f"train_prompts={self.train_prompts} must be at least "
                f"prompts_per_step={self.prompts_per_step}."
            )
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                f"eval_every={self.eval_every} (checkpoints are written after evaluations)."
            )

    @property
    def batch_size(self) -> int:
        """Completions per step."""
        return self.prompts_per_step * self.group_size

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {**fields, "model": self.model.to_dict()}


# ---------------------------------------------------------------------------------------------
# The policy's log-probabilities, the advantages and the update


def token_scores(loss: str, temperature: float) -> sampling.Score:
    """``(hidden [..., d], classifier [V, d], tokens [...]) -> (log p, entropy)`` under
    ``softmax(hidden classifier^T / T)``: the one function that sampler and trainer call."""
    if loss == "naive":

        def from_logits(hidden, classifier, tokens):
            logits = hidden @ classifier.T
            return jaxsoftmax.token_log_probs(
                logits, tokens, temperature=temperature, return_entropy=True
            )

        return from_logits
    return functools.partial(
        jaxsoftmax.linear_token_log_probs,
        temperature=temperature,
        return_entropy=True,
        batch_invariant=True,
    )


def completion_scores(config: GRPOConfig, score: sampling.Score, params, prompts, completions):
    """``(log p, entropy)`` ``[B, N]`` of ``completions [B, N]`` after ``prompts [B, P]``."""
    inputs = sampling.model_inputs(prompts, completions)
    hidden = transformer.hidden_states(params, inputs, num_heads=config.model.num_heads)
    states = sampling.completion_states(hidden, config.prompt_tokens)
    return score(states, transformer.classifier(params), completions)


def group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """float32 ``[B]``: ``(r - mean) / (std + 1e-4)`` within each group of ``group_size``
    consecutive completions (the population's standard deviation)."""
    groups = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    return (
        (centred / (groups.std(axis=1, keepdims=True) + ADVANTAGE_EPSILON))
        .reshape(-1)
        .astype(np.float32)
    )


class Batch(NamedTuple):
    """A sampled batch as the update reads it (``B`` completions of ``N`` tokens)."""

    prompts: jax.Array  # int32 [B, P]
    completions: jax.Array  # int32 [B, N]
    old_log_probs: jax.Array  # float32 [B, N], the sampler's
    ref_log_probs: jax.Array  # float32 [B, N], the initial model's
    advantages: jax.Array  # float32 [B]
    mask: jax.Array  # bool [B, N]


def make_optimizer(config: GRPOConfig) -> optax.GradientTransformation:
    """Adam at a constant ``learning_rate``, after clipping the gradient's global norm."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm), optax.adam(config.learning_rate)
    )


def make_update(config: GRPOConfig, optimizer, loss: str) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)``: ``updates_per_batch`` optimizer steps
    on the batch (``state.step`` counts batches); each metric is stacked over those steps:
    ``loss`` and the fields of ``jaxsoftmax.PolicyGradientMetrics``."""
    score = token_scores(loss, config.temperature)

    def objective(params, batch: Batch):
        log_probs, entropy = completion_scores(
            config, score, params, batch.prompts, batch.completions
        )
        return jaxsoftmax.policy_gradient_loss(
            log_probs,
            batch.old_log_probs,
            batch.advantages,
            mask=batch.mask,
            epsilon_low=config.clip_epsilon,
            ref_log_probs=batch.ref_log_probs,
            kl_coef=config.kl_coef,
            entropy=entropy,
            entropy_coef=config.entropy_coef,
        )

    def update(state: TrainState, batch: Batch):
        def one_step(carry, _):
            params, opt_state = carry
            (loss_value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
                params, batch
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), {
                "loss": loss_value,
                **metrics._asdict(),
            }

        (params, opt_state), metrics = jax.lax.scan(
            one_step, (state.params, state.opt_state), length=config.updates_per_batch
        )
        return TrainState(params, opt_state, state.step + 1), metrics

    return jax.jit(update)


# ---------------------------------------------------------------------------------------------
# The task: prompts, samples and their rewards


@dataclasses.dataclass
class Task:
    """The prompts and what turns a completion into a reward.

    Attributes:
      train, held_out: prompts cut from the training and validation splits.
      tokenizer: the corpus's tokenizer (``tokenizers.Tokenizer``).
      ends_line: bool ``[V]``, the tokens that end a line.
    """

    train: python_lines.Prompts
    held_out: python_lines.Prompts
    tokenizer: Any
    ends_line: np.ndarray

    def rewards(self, heads, completions: Any) -> tuple[np.ndarray, list[str]]:
        """``(rewards [B], completed lines)`` of sampled ``completions``
        (:class:`sampling.Completions`) of the lines beginning with ``heads``."""
        tokens, mask, ended = jax.device_get(
            (completions.tokens, completions.mask, completions.ended)
        )
        texts = self.tokenizer.decode_batch(
            [row[:length].tolist() for row, length in zip(tokens, mask.sum(axis=1), strict=True)]
        )
        rewards = np.array(
            [
                python_lines.line_reward(head, text, bool(done))
                for head, text, done in zip(heads, texts, ended, strict=True)
            ]
        )
        lines = [python_lines.completed_line(h, t) for h, t in zip(heads, texts, strict=True)]
        return rewards, lines


def make_task(config: GRPOConfig, corpus) -> Task:
    """The prompts of ``config`` cut from ``corpus`` (``text_corpus.load``)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(corpus.tokenizer_path)
    end_of_text = tokenizer.token_to_id(text_corpus.END_OF_TEXT)
    ends_line = python_lines.line_ending_tokens(tokenizer, corpus.vocab_size, end_of_text)
    cut = functools.partial(
        python_lines.cut_prompts,
        tokenizer=tokenizer,
        ends_line=ends_line,
        prompt_tokens=config.prompt_tokens,
        end_of_text=end_of_text,
    )
    return Task(
        train=cut(corpus.train_tokens, count=config.train_prompts, seed=config.seed),
        held_out=cut(corpus.validation_tokens, count=config.eval_prompts, seed=config.seed + 1),
        tokenizer=tokenizer,
        ends_line=ends_line,
    )


def step_prompts(config: GRPOConfig, step: int) -> np.ndarray:
    """The indices of step ``step``'s training prompts: drawn without replacement from
    ``(seed, step)``, so a resumed run draws what an uninterrupted one would."""
    random = np.random.default_rng([config.seed, step])
    return random.choice(config.train_prompts, config.prompts_per_step, replace=False)


def sample_key(config: GRPOConfig, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), step)


def evaluation_key(config: GRPOConfig) -> jax.Array:
    """The held-out evaluation's random numbers, the same at every evaluation."""
    return jax.random.fold_in(jax.random.key(config.seed), 3)


def in_groups(config: GRPOConfig, prompts: np.ndarray) -> jax.Array:
    """``[B, P]``: each prompt ``group_size`` times in a row."""
    return jnp.asarray(np.repeat(prompts, config.group_size, axis=0))


def initial_state(optimizer, params) -> TrainState:
    """Step 0 of a run from the language model's ``params``."""
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=4)
def compiled_functions(config: GRPOConfig, ends_line_bytes: bytes) -> dict:
    """The optimizer and the programs of ``config``, compiled once per process for the run's
    shapes, before any clock starts: ``sample``, ``score`` (:func:`completion_scores`, for the
    reference model's log-probabilities), ``update`` (:func:`make_update`), ``init``
    (:func:`initial_state`) and ``evaluate_model`` (the language model's next-token loss).
    ``ends_line_bytes``: the task's ``ends_line`` table as bytes (hashable)."""
    ends_line = np.frombuffer(ends_line_bytes, bool)
    optimizer = make_optimizer(config)
    score = token_scores(config.loss, config.temperature)
    sampler = sampling.make_sampler(
        num_heads=config.model.num_heads,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        ends_line=ends_line,
        score=score,
    )
    shapes = abstract_inputs(config, ends_line.size)
    init = jax.jit(
        functools.partial(initial_state, optimizer),
        compiler_options=training.RUN_ONCE_COMPILER_OPTIONS,
    )
    score_completions = jax.jit(functools.partial(completion_scores, config, score))
    state = jax.eval_shape(init, shapes.params)
    return {
        "optimizer": optimizer,
        "init": init,
        "sample": sampler.lower(shapes.params, shapes.prompts, shapes.key).compile(),
        "score": score_completions.lower(
            shapes.params, shapes.prompts, shapes.completions
        ).compile(),
        "update": make_update(config, optimizer, config.loss).lower(state, shapes.batch).compile(),
        "evaluate_model": lm_training.make_evaluate(config.model),
    }


class AbstractInputs(NamedTuple):
    params: Any
    prompts: jax.ShapeDtypeStruct
    completions: jax.ShapeDtypeStruct
    key: Any
    batch: Batch


def abstract_inputs(config: GRPOConfig, vocab_size: int) -> AbstractInputs:
    """The shapes and types of the programs' inputs."""
    size = (config.batch_size, config.max_new_tokens)
    per_token = jax.ShapeDtypeStruct(size, jnp.float32)
    prompts = jax.ShapeDtypeStruct((config.batch_size, config.prompt_tokens), jnp.int32)
    completions = jax.ShapeDtypeStruct(size, jnp.int32)
    return AbstractInputs(
        params=jax.eval_shape(lambda: lm_training.init_params(config.model, vocab_size)),
        prompts=prompts,
        completions=completions,
        key=jax.eval_shape(lambda: jax.random.key(0)),
        batch=Batch(prompts, completions, per_token, per_token,
                    jax.ShapeDtypeStruct((config.batch_size,), jnp.float32),
                    jax.ShapeDtypeStruct(size, bool)),
    )  # fmt: skip


def functions_for(config: GRPOConfig, task: Task) -> dict:
    return compiled_functions(config, task.ends_line.tobytes())


def sampled_batch(config, functions, task, params, ref_params, prompts, heads, key):
    """``(batch, rewards, completions, lines)``: one sampled batch of ``prompts`` (``[n, P]``,
    each ``group_size`` times) with its rewards and advantages."""
    prompts = in_groups(config, prompts)
    completions = functions["sample"](params, prompts, key)
    rewards, lines = task.rewards([h for h in heads for _ in range(config.group_size)], completions)
    ref_log_probs, _ = functions["score"](ref_params, prompts, completions.tokens)
    batch = Batch(
        prompts=prompts,
        completions=completions.tokens,
        old_log_probs=completions.log_probs,
        ref_log_probs=ref_log_probs,
        advantages=jnp.asarray(group_advantages(rewards, config.group_size)),
        mask=completions.mask,
    )
    return batch, rewards, completions, lines


def masked_mean(values, mask) -> float:
    values, mask = np.asarray(values, np.float64), np.asarray(mask)
    return float(values[mask].mean()) if mask.any() else 0.0


def k3(log_probs, ref_log_probs):
    """The k3 estimate of ``KL(policy || reference)`` per token: ``e^d - d - 1``,
    ``d = log p_ref - log p``."""
    d = np.asarray(ref_log_probs, np.float64) - np.asarray(log_probs, np.float64)
    return np.expm1(d) - d


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluator(config: GRPOConfig, functions: dict, task: Task, ref_params, corpus) -> Callable:
    """``params -> row``: on the held-out prompts, ``group_size`` completions each with a key
    that never changes (so that only the policy changes between evaluations): ``heldout_reward``
    (the fraction of completed lines that parse), ``heldout_ended`` (the fraction that ended
    their line), ``heldout_tokens`` (mean tokens per completion), ``heldout_entropy`` and
    ``heldout_kl`` (per completion token: the policy's entropy, and the k3 estimate of its KL
    divergence from the initial model); and ``validation_loss``, the language model's
    next-token loss on the fixed validation windows of ``language_model.py``."""
    windows = lm_training.placed_evaluation_windows(config.model, corpus)
    validation = lm_training.evaluator(
        functions["evaluate_model"], {"validation": windows["validation"]}, ("loss",)
    )
    key = evaluation_key(config)
    held_out = task.held_out
    chunk = config.prompts_per_step

    def evaluate(params) -> dict:
        rewards, ended, tokens, entropy, kl = [], [], [], [], []
        for first in range(0, len(held_out), chunk):
            batch, chunk_rewards, completions, _ = sampled_batch(
                config, functions, task, params, ref_params,
                held_out.tokens[first : first + chunk], held_out.heads[first : first + chunk],
                jax.random.fold_in(key, first),
            )  # fmt: skip
            mask = np.asarray(batch.mask)
            rewards.append(chunk_rewards)
            ended.append(np.asarray(completions.ended))
            tokens.append(mask.sum(axis=1))
            entropy.append(np.asarray(completions.entropy)[mask])
            kl.append(k3(batch.old_log_probs, batch.ref_log_probs)[mask])
        return {
            "heldout_reward": float(np.mean(np.concatenate(rewards))),
            "heldout_ended": float(np.mean(np.concatenate(ended))),
            "heldout_tokens": float(np.mean(np.concatenate(tokens))),
            "heldout_entropy": float(np.mean(np.concatenate(entropy))),
            "heldout_kl": float(np.mean(np.concatenate(kl))),
            **validation(params),
        }

    return evaluate


def examples(config: GRPOConfig, task: Task, params, count: int = 4) -> list[dict]:
    """The completed lines of the first ``count`` held-out prompts, as the evaluation
    samples them (its first batch, its random numbers): ``[{"line_start", "file_rest",
    "completions": [{"line", "reward"}, ...]}]``."""
    functions = functions_for(config, task)
    held_out, chunk = task.held_out, config.prompts_per_step
    _, rewards, _, lines = sampled_batch(
        config, functions, task, params, params, held_out.tokens[:chunk], held_out.heads[:chunk],
        jax.random.fold_in(evaluation_key(config), 0),
    )  # fmt: skip
    group = config.group_size
    return [
        {
            "line_start": held_out.heads[i],
            "file_rest": held_out.rests[i],
            "completions": [
                {"line": lines[j], "reward": float(rewards[j])}
                for j in range(i * group, (i + 1) * group)
            ],
        }
        for i in range(min(count, chunk))
    ]


# ---------------------------------------------------------------------------------------------
# The loop

TRAINING_COLUMNS = (
    "train_reward", "train_ended", "train_tokens", "entropy", "kl", "clip_fraction", "loss",
    "first_ratio_min", "first_ratio_max",
)  # fmt: skip


@dataclasses.dataclass
class GRPOResult:
    """What :func:`train` returns: the final ``params``, the ``history`` (one row per
    evaluation, the first at step 0), ``steps``, ``resumed_from`` (the checkpoint's step or
    None), ``seconds_per_step`` (sampling, rewards and updates; no compilation, no evaluation;
    steps before a resume included), ``sample_seconds`` and ``update_seconds`` (their parts)
    and ``train_seconds`` (this call's wall time, compilation and evaluations included)."""

    params: Any
    history: list[dict]
    steps: int
    resumed_from: int | None
    seconds_per_step: float
    sample_seconds: float
    update_seconds: float
    train_seconds: float


def steps_of(config: GRPOConfig, functions: dict, task: Task, ref_params) -> Callable:
    """``(state, num_steps) -> (state, outputs)``: GRPO steps; ``outputs`` a dict of per-step
    lists (:data:`TRAINING_COLUMNS` and the seconds spent sampling and updating)."""

    def run(state: TrainState, num_steps: int):
        outputs = {name: [] for name in (*TRAINING_COLUMNS, "sample_seconds", "update_seconds")}
        for _ in range(num_steps):
            step = int(state.step)
            chosen = step_prompts(config, step)
            began = time.perf_counter()
            batch, rewards, completions, _ = sampled_batch(
                config, functions, task, state.params, ref_params, task.train.tokens[chosen],
                [task.train.heads[i] for i in chosen], sample_key(config, step),
            )  # fmt: skip
            jax.block_until_ready(batch)
            updating = time.perf_counter()
            state, metrics = functions["update"](state, batch)
            metrics = jax.device_get(metrics)
            done = time.perf_counter()
            first = {name: value[0] for name, value in metrics.items()}
            outputs["train_reward"].append(float(np.mean(rewards)))
            outputs["train_ended"].append(float(np.mean(np.asarray(completions.ended))))
            outputs["train_tokens"].append(float(np.asarray(batch.mask).sum(axis=1).mean()))
            outputs["entropy"].append(float(first["entropy_mean"]))
            outputs["kl"].append(float(first["kl_mean"]))
            outputs["clip_fraction"].append(float(np.mean(metrics["clip_fraction"])))
            outputs["loss"].append(float(first["loss"]))
            outputs["first_ratio_min"].append(float(first["ratio_min"]))
            outputs["first_ratio_max"].append(float(first["ratio_max"]))
            outputs["sample_seconds"].append(updating - began)
            outputs["update_seconds"].append(done - updating)
        return state, outputs

    return run


def history_row(evaluate: Callable) -> Callable:
    """The run loop's ``history_row``: the means of the run's steps, the first update's ratio
    extremes over them, the held-out evaluation and the run's seconds."""

    def row(state: TrainState, outputs: dict, seconds: float, length: int) -> dict:
        means = {name: float(np.mean(outputs[name])) for name in TRAINING_COLUMNS}
        means["first_ratio_min"] = float(np.min(outputs["first_ratio_min"]))
        means["first_ratio_max"] = float(np.max(outputs["first_ratio_max"]))
        return {
            "step": int(state.step),
            **means,
            **evaluate(state.params),
            "run_seconds": seconds,
            "sample_seconds": float(np.sum(outputs["sample_seconds"])),
            "update_seconds": float(np.sum(outputs["update_seconds"])),
        }

    return row


def train(
    config: GRPOConfig,
    corpus,
    task: Task,
    initial_params,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    on_run_end: Callable[[dict, int], None] | None = None,
) -> GRPOResult:
    """Fine-tunes ``initial_params`` (the language model, also the KL's reference) with GRPO;
    ``eval_every`` steps at a time, then a held-out evaluation (:func:`evaluator`), a checkpoint
    every ``checkpoint_every`` steps (the policy, its optimizer state and the history; a
    resumed run ends bit for bit where an uninterrupted one does, on the CPU), through
    :func:`jaxsoftmax.training.run_loop`.

    History rows: ``step``; the means over the run's steps of ``train_reward`` (the fraction
    of the batch's completed lines that parse), ``train_ended``, ``train_tokens``, ``entropy``
    and ``kl`` (the first update's, per counted token), ``clip_fraction`` (over all updates),
    ``loss``; ``first_ratio_min`` and ``first_ratio_max`` (the first update's importance
    ratios: 1 and 1 when on-policy scoring is exact); the evaluation's columns;
    ``run_seconds``, ``sample_seconds`` and ``update_seconds``.
    """
    started = time.perf_counter()
    functions = functions_for(config, task)
    evaluate = evaluator(config, functions, task, initial_params, corpus)

    def fresh() -> tuple[TrainState, list[dict]]:
        no_step = {name: None for name in TRAINING_COLUMNS}
        row = {"step": 0, **no_step, **evaluate(initial_params)}
        return functions["init"](initial_params), [
            row | {"run_seconds": None, "sample_seconds": None, "update_seconds": None}
        ]

    abstract_state = jax.eval_shape(functions["init"], initial_params)
    start = lm_training.start_run(
        config, config, corpus, abstract_state, fresh, checkpoint_dir=checkpoint_dir,
        resume=resume,
    )  # fmt: skip
    state, history = lm_training.run_from(
        start,
        config,
        run_steps=steps_of(config, functions, task, initial_params),
        history_row=history_row(evaluate),
        non_finite=lm_training.loss_or_parameters_non_finite,
        advice=f"Try a smaller --lr (was {config.learning_rate}).",
        on_run_end=on_run_end,
    )
    jax.block_until_ready(state.params)
    seconds = {
        name: sum(row[name] or 0.0 for row in history)
        for name in ("run_seconds", "sample_seconds", "update_seconds")
    }
    steps = int(state.step)
    per_step = lambda name: seconds[name] / steps if steps else 0.0
    return GRPOResult(
        params=state.params,
        history=history,
        steps=steps,
        resumed_from=start.resumed_from,
        seconds_per_step=per_step("run_seconds"),
        sample_seconds=per_step("sample_seconds"),
        update_seconds=per_step("update_seconds"),
        train_seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# The two log-probability paths side by side


def compare_losses(config: GRPOConfig, task: Task, params, rounds: int) -> dict:
    """The update of each ``loss`` compiled at the run's shape, on one batch sampled by
    ``params`` (step 0's prompts): its compiled temporary memory
    (``memory_analysis().temp_size_in_bytes``), its median seconds over ``rounds`` interleaved
    rounds (:func:`harness.time_interleaved`; compilation excluded), and the largest difference
    between the two paths' log-probabilities of the batch's counted tokens."""
    functions = functions_for(config, task)
    chosen = step_prompts(config, 0)
    batch, *_ = sampled_batch(
        config, functions, task, params, params, task.train.tokens[chosen],
        [task.train.heads[i] for i in chosen], sample_key(config, 0),
    )  # fmt: skip
    state = functions["init"](params)
    results, calls = {}, {}
    for loss in LOSSES:
        compiled = functions["update"]
        if loss != config.loss:
            update = make_update(config, functions["optimizer"], loss)
            compiled = update.lower(state, batch).compile()
        results[loss] = {"step_temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}
        calls[loss] = functools.partial(compiled, state, batch)
    seconds = harness.time_interleaved(calls, rounds)
    log_probs = {}
    for loss in LOSSES:
        scores = functools.partial(
            completion_scores, config, token_scores(loss, config.temperature)
        )
        log_probs[loss], _ = jax.jit(scores)(params, batch.prompts, batch.completions)
    mask = np.asarray(batch.mask)
    difference = np.abs(np.asarray(log_probs["fused"]) - np.asarray(log_probs["naive"]))[mask]
    for loss in LOSSES:
        results[loss]["seconds_per_update"] = seconds[loss]
    return {
        **results,
        "rounds": rounds,
        "shape": {
            "completions": config.batch_size,
            "prompt_tokens": config.prompt_tokens,
            "completion_tokens": config.max_new_tokens,
            "scored_tokens": config.batch_size * config.max_new_tokens,
            "vocab_size": int(transformer.classifier(params).shape[0]),
            "d_model": int(transformer.classifier(params).shape[1]),
            "updates_per_batch": config.updates_per_batch,
        },
        "max_log_prob_difference": float(difference.max()) if difference.size else 0.0,
    }

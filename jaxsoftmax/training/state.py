"""What changes from step to step, the optimizer, and a run's first state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsoftmax import mlp
from jaxsoftmax.training.config import TrainConfig

# For programs that run once (the initial state): compiling fast matters more than running fast.
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class TrainState(NamedTuple):
    """What changes from step to step: a pytree, so it can be the carry of ``lax.scan``."""

    params: mlp.Params
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: the number of steps taken


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``optax.sgd`` (with ``momentum`` for ``"momentum"``) or ``optax.adam`` at ``learning_rate``."""
    if config.optimizer == "sgd":
        return optax.sgd(config.learning_rate)
    if config.optimizer == "momentum":
        return optax.sgd(config.learning_rate, momentum=config.momentum)
    return optax.adam(config.learning_rate)


def _initial_params(
    seed_key: jax.Array, sizes: tuple[int, ...], scheme: str, scale: float
) -> mlp.Params:
    """``mlp.init`` from ``fold_in(seed_key, 0)``."""
    return mlp.init(jax.random.fold_in(seed_key, 0), sizes, scheme=scheme, scale=scale)


# Run eagerly, each ``jax.random`` operation compiles a program of its own (1.4 s on the 2-core
# CPU for the spiral's network, longer than compiling the training run); compiled whole with
# XLA's optimizations, the random-number code takes 1.0 s to compile for a program that runs
# once in a millisecond. Unoptimized it compiles in about 0.4 s. The values equal the eager ones
# up to the last bit of some weights, the same on every run.
_initial_params_compiled_once = jax.jit(
    _initial_params, static_argnums=(1, 2, 3), compiler_options=RUN_ONCE_COMPILER_OPTIONS
)


def init_state(
    config: TrainConfig, num_features: int, num_classes: int
) -> tuple[TrainState, optax.GradientTransformation]:
    """Fresh parameters from ``fold_in(key(seed), 0)``, the optimizer and its initial state.

    Called inside a trace (``jit``, ``eval_shape``), the draw becomes part of the caller's
    program instead of a program compiled on its own.
    """
    sizes = (num_features, *config.hidden, num_classes)
    seed_key = jax.random.key(config.seed)
    # Compiler options are for top-level programs only: traced, the draw joins the caller's.
    draw = (
        _initial_params if isinstance(seed_key, jax.core.Tracer) else _initial_params_compiled_once
    )
    params = draw(seed_key, sizes, config.init_scheme, config.init_scale)
    optimizer = make_optimizer(config)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32)), optimizer

"""The plan of the fused distillation: its static choices and the tiles it visits.

The fused distillation (:mod:`jaxsoftmax.tiles.distillation`) holds one ``[T, Vc]`` tile of
each model's logits at a time, the student's ``z_s = h_s W_s^T + b_s`` and the teacher's
``z_t = h_t W_t^T + b_t``, at the same tokens and classes. Here are what the forward
(:mod:`jaxsoftmax.tiles.distillation_forward`) and the backward
(:mod:`jaxsoftmax.tiles.distillation_backward`) share:

* :class:`DistillationPlan`, the static choices of one call;
* :class:`Wanted`, which models' gradients the backward computes;
* :class:`TileGrid` (from :func:`tile_grid`), the chunks of one call's tokens and classes;
* :func:`tile_pair`, both models' logits of one tile, and :func:`masked`.

Ragged chunks are moved back to end at the last token or class and the classes an earlier
chunk already visited are masked, as in :mod:`jaxsoftmax.tiles.plan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsoftmax.checks.linear_head import LinearHead
from jaxsoftmax.core import divergences, row_terms
from jaxsoftmax.core.chunks import operand_chunk
from jaxsoftmax.tiles import plan as tile_plan
from jaxsoftmax.tiles import tpu_layout


@dataclasses.dataclass(frozen=True)
class DistillationPlan:
    """Static choices of one call (see :class:`jaxsoftmax.tiles.plan.TilePlan`): the
    divergence, the hard term's weight, the layout, the tile, and the vocabulary split
    (``options.axis_name``, ``num_classes``: all ``V`` real classes when sharded)."""

    divergence: divergences.DivergenceOptions
    hard_weight: float
    layout: str
    token_chunk: int
    vocab_chunk: int
    options: row_terms.RuleOptions = row_terms.RuleOptions()  # the hard term's rule, axis_name
    num_classes: int | None = None
    tiles: tuple = ()
    transposed: bool = False  # computed on the classifiers' transposes (tiles/tpu_layout.py)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Wanted:
    """Which models' gradients the backward computes (static, carried in the residuals)."""

    student: bool
    teacher: bool


def as_computed(student: LinearHead, teacher: LinearHead, plan: DistillationPlan):
    """``(student, teacher, plan)`` with the classifiers as the program computes them
    (transposed on a TPU that stores them column-major: :mod:`jaxsoftmax.tiles.tpu_layout`)."""
    classifiers, computed = tpu_layout.as_computed((student.classifier, teacher.classifier), plan)
    student, teacher = (m._replace(classifier=c) for m, c in zip((student, teacher), classifiers))
    return student, teacher, computed


def compute_dtype(student: LinearHead, teacher: LinearHead):
    """The dtype both models' tiles are computed in: the wider of the two models'."""
    return divergences.wider_compute_dtype(student.hidden.dtype, teacher.hidden.dtype)


class TileGrid(NamedTuple):
    """One call's tiles: the two models, the compute dtype, this shard's place in the
    vocabulary (:func:`jaxsoftmax.tiles.plan.vocabulary`) and where chunk ``i`` starts."""

    student: LinearHead
    teacher: LinearHead
    plan: DistillationPlan
    dtype: Any
    offset: Any  # this shard's first class (0 without a vocabulary split)
    num_classes: int  # all real classes
    rule: row_terms.RuleOptions  # the hard term's rule, per tile
    num_tc: int
    token_start: Callable
    num_vc: int
    vocab_start: Callable


def tile_grid(student: LinearHead, teacher: LinearHead, plan: DistillationPlan) -> TileGrid:
    """The tiles of ``student``'s and ``teacher``'s logits under ``plan``."""
    local, num_classes, offset, rule = tile_plan.vocabulary(student.classifier, plan)
    dtype = compute_dtype(student, teacher)
    num_tc, token_start = tile_plan.chunk_starts(student.hidden.shape[0], plan.token_chunk)
    num_vc, vocab_start = tile_plan.chunk_starts(local, plan.vocab_chunk)
    return TileGrid(student, teacher, plan, dtype, offset, num_classes, rule, num_tc,
                    token_start, num_vc, vocab_start)  # fmt: skip


def fresh_classes(grid: TileGrid, v0, i, vocab_mask):
    """The classes of vocabulary chunk ``i`` (starting at ``v0``) that count, ``[Vc]``."""
    plan = grid.plan
    return tile_plan.visited(v0, i, plan.vocab_chunk, grid.offset, grid.num_classes,
                             plan.options, vocab_mask)  # fmt: skip


def tile_pair(grid: TileGrid, t0, v0):
    """The student's and the teacher's ``[T, Vc]`` logits of the tile at ``(t0, v0)``."""
    return _tile_logits(grid, grid.student, t0, v0), _tile_logits(grid, grid.teacher, t0, v0)


def _tile_logits(grid: TileGrid, model: LinearHead, t0, v0):
    plan = grid.plan
    tc, vc = plan.token_chunk, plan.vocab_chunk
    bias = None if model.bias is None else lax.dynamic_slice_in_dim(model.bias, v0, vc)
    classifier = tile_plan.classifier_chunk(model.classifier, v0, vc, plan.layout)
    return tile_plan.tile_logits(operand_chunk(model.hidden, t0, tc), classifier, bias,
                                 plan.layout, grid.dtype)  # fmt: skip


def masked(x, fresh):
    """``x`` with the classes that do not count (``fresh`` False) at ``-inf``."""
    return tile_plan.where_visited(fresh, x, -jnp.inf)

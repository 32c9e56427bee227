"""jaxsoftmax: softmax cross-entropy for JAX with the hand-derived backward rule.

The public API:

* :func:`cross_entropy`: the general loss (PyTorch's options plus z-loss and soft cap).
* :func:`softmax_cross_entropy`, :func:`softmax_cross_entropy_with_integer_labels`:
  drop-in replacements for optax's losses of the same names, with forward mode.
* :func:`checked`: run a loss called with ``checked=True`` so bad labels raise.
* :class:`LossAux`: what the losses return beside the loss with ``return_aux=True``
  (log-sum-exp, z-loss term, whether the prediction is right, entropy; per example).
* :func:`linear_cross_entropy`: classifier layer and loss fused; never builds the
  ``[N, V]`` logits. It has no ``axis_name=``: the vocabulary-split fused loss is
  :func:`sharded_linear_cross_entropy`.
* :func:`sharded_cross_entropy`: the vocabulary-parallel loss on a device mesh (the
  ``shard_map`` done for you); ``axis_name=`` on the losses inside your own ``shard_map``.
* :func:`sharded_linear_cross_entropy`: :func:`linear_cross_entropy` with the classifier
  split by vocabulary rows over a mesh axis; only per-row statistics cross devices in the loss.
* :func:`distillation_loss`: forward KL, reverse KL or the Jensen-Shannon divergence
  between a student's and a teacher's softmax (with temperature and hard labels), by
  derived rules for both models' logits; forward and reverse mode.
* :func:`linear_distillation_loss`: the same with both classifier layers fused, never
  building either model's ``[N, V]`` logits; :func:`sharded_linear_distillation_loss` splits
  both classifiers by vocabulary over a mesh axis.
* :func:`token_log_probs`: each sampled token's log-probability under ``softmax(z / T)``
  and the policy's entropy (reinforcement learning), by their derived rule, forward and
  reverse mode; :func:`linear_token_log_probs` the same from hidden states without the
  logits (``batch_invariant=True``: bitwise the same whatever the batch), and
  :func:`sharded_linear_token_log_probs` with the vocabulary split over a mesh axis.
* :func:`policy_gradient_loss`: GRPO, PPO, DAPO, Dr. GRPO, GSPO and CISPO on per-token
  log-probabilities, with a KL penalty, an entropy bonus and the metrics trainers log
  (:class:`PolicyGradientMetrics`).
* :func:`sequence_log_probs`: each response's summed token log-probability and length
  (:class:`SequenceLogProbs`), from a mask (a response per row) or segment ids (packed rows).
* :func:`preference_pairs`: a batch's responses split into the chosen and the rejected, in
  the ``"interleaved"`` or ``"halves"`` layout.
* :func:`preference_loss`: DPO (with conservative DPO's label smoothing), IPO, hinge, robust
  DPO, SimPO, ORPO and CPO on the pairs' log-probabilities, with the metrics trainers log
  (:class:`PreferenceMetrics`).
* :func:`linear_preference_loss`: the same from the policy's and a frozen reference's hidden
  states, never building either ``[N, V]`` (the reference: forward only, no gradient).
* :func:`sharded_linear_preference_loss`: :func:`linear_preference_loss` with both
  classifiers split by vocabulary over a mesh axis.
* :mod:`jaxsoftmax.mlp`, :mod:`jaxsoftmax.data`, :mod:`jaxsoftmax.training`: CS231n's
  two-layer fully connected network (any depth) as pure functions, its data sets, and its
  compiled training (:func:`train`, :class:`TrainConfig`, :class:`NonFiniteLossError`).
"""

from jaxsoftmax import data as data
from jaxsoftmax import mlp as mlp
from jaxsoftmax import training as training
from jaxsoftmax.checks.checked_mode import checked as checked
from jaxsoftmax.core.companion_terms import LossAux as LossAux
from jaxsoftmax.losses.cross_entropy import cross_entropy as cross_entropy
from jaxsoftmax.losses.distillation import distillation_loss as distillation_loss
from jaxsoftmax.losses.linear_cross_entropy import linear_cross_entropy as linear_cross_entropy
from jaxsoftmax.losses.linear_distillation import (
    linear_distillation_loss as linear_distillation_loss,
)
from jaxsoftmax.losses.linear_preference import linear_preference_loss as linear_preference_loss
from jaxsoftmax.losses.linear_token_log_probs import (
    linear_token_log_probs as linear_token_log_probs,
)
from jaxsoftmax.losses.optax_compatible import softmax_cross_entropy as softmax_cross_entropy
from jaxsoftmax.losses.optax_compatible import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jaxsoftmax.losses.policy_gradient import PolicyGradientMetrics as PolicyGradientMetrics
from jaxsoftmax.losses.policy_gradient import policy_gradient_loss as policy_gradient_loss
from jaxsoftmax.losses.preference import PreferenceMetrics as PreferenceMetrics
from jaxsoftmax.losses.preference import preference_loss as preference_loss
from jaxsoftmax.losses.sequence_log_probs import SequenceLogProbs as SequenceLogProbs
from jaxsoftmax.losses.sequence_log_probs import preference_pairs as preference_pairs
from jaxsoftmax.losses.sequence_log_probs import sequence_log_probs as sequence_log_probs
from jaxsoftmax.losses.sharded_cross_entropy import sharded_cross_entropy as sharded_cross_entropy
from jaxsoftmax.losses.sharded_linear_cross_entropy import (
    sharded_linear_cross_entropy as sharded_linear_cross_entropy,
)
from jaxsoftmax.losses.sharded_linear_distillation import (
    sharded_linear_distillation_loss as sharded_linear_distillation_loss,
)
from jaxsoftmax.losses.sharded_linear_preference import (
    sharded_linear_preference_loss as sharded_linear_preference_loss,
)
from jaxsoftmax.losses.sharded_linear_token_log_probs import (
    sharded_linear_token_log_probs as sharded_linear_token_log_probs,
)
from jaxsoftmax.losses.token_log_probs import token_log_probs as token_log_probs
from jaxsoftmax.training import NonFiniteLossError as NonFiniteLossError
from jaxsoftmax.training import TrainConfig as TrainConfig
from jaxsoftmax.training import train as train


def _version() -> str:
    """This package's version. Run from a source tree, the ``[project] version`` of the
    ``pyproject.toml`` beside it, marked ``+source`` unless the installed distribution (this
    tree installed editable) has the same version; installed from a wheel, the installed
    distribution's; ``"0.0.0+unknown"`` without either. The imports stay out of the namespace."""
    import importlib.metadata
    import pathlib

    try:
        installed = importlib.metadata.version("jaxsoftmax")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    pyproject = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():  # an installed wheel: site-packages holds no pyproject.toml
        return installed or "0.0.0+unknown"
    import tomllib

    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        project = {}
    if project.get("name") != "jaxsoftmax" or "version" not in project:
        return installed or "0.0.0+unknown"
    source = project["version"]
    return source if installed == source else f"{source}+source"


__version__ = _version()

__all__ = [
    "LossAux",
    "NonFiniteLossError",
    "PolicyGradientMetrics",
    "PreferenceMetrics",
    "SequenceLogProbs",
    "TrainConfig",
    "checked",
    "cross_entropy",
    "data",
    "distillation_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_preference_loss",
    "linear_token_log_probs",
    "mlp",
    "policy_gradient_loss",
    "preference_loss",
    "preference_pairs",
    "sequence_log_probs",
    "sharded_cross_entropy",
    "sharded_linear_cross_entropy",
    "sharded_linear_distillation_loss",
    "sharded_linear_preference_loss",
    "sharded_linear_token_log_probs",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "token_log_probs",
    "train",
    "training",
]

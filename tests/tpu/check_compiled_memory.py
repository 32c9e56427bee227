"""The fused losses' TPU programs at their memory bound, compiled here without a TPU.

Not collected by the default test run (the name does not start with ``test_``): it needs
``libtpu``, which the README's install does not bring. ``.ci/run`` runs it after the README's
test command, in the same environment with ``jax[tpu]`` added::

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"
    python -m pytest -q -p no:cacheprovider tests/tpu/check_compiled_memory.py

Each check compiles ``value_and_grad`` of a fused loss for one chip of TPU v5e (or the v5e 2x4
mesh), through ``experiments/tpu_memory.py``'s programs, and asserts the TPU compiler's
temporary bytes against the bound of the tiles and float32 sums (its docstring), and that the
optimized program copies, converts or transposes nothing of the classifier's or the logits'
shape. Before
``jaxsoftmax/core/tpu_programs.py`` (Gemma 2 in float32: a bf16 copy of the whole classifier,
1,161 MiB) and the TPU's lane-aligned vocabulary chunk in ``jaxsoftmax/tiles/sizes.py``
(Llama 3: a ``[d, V]`` copy, 2,004 MiB in float32, 1,258 MiB in bf16) and
``jaxsoftmax/tiles/tpu_layout.py`` (each chip's ``[d, V]`` classifier on the mesh copied)
these checks failed.
"""

from __future__ import annotations

import functools
import os
import re
import sys

import jax.numpy as jnp
import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "experiments")
)
import tpu_memory  # noqa: E402  (experiments/tpu_memory.py)

MiB = 2**20
GEMMA, LLAMA = tpu_memory.SHAPES["gemma-2-2b"], tpu_memory.SHAPES["llama-3"]
# The ceilings (MiB), beside the bound: Gemma 2 f32 <= 64, bf16 <= 128; Llama 3 <= 400.
CEILINGS = {("gemma", "float32"): 64, ("gemma", "bfloat16"): 128}
CEILINGS |= {("llama", "float32"): 400, ("llama", "bfloat16"): 400}


@functools.cache
def compiled(loss, shape, dtype, layout, grads):
    """``tpu_memory.measure`` of jaxsoftmax's program, and the bound, on TPU v5e."""
    programs, chips = tpu_memory.programs_for(loss, "v5e", shape, jnp.dtype(dtype), layout, grads)
    found = tpu_memory.measure(programs["jaxsoftmax"], tpu_memory.large_shapes(loss, shape, chips))
    return found, tpu_memory.fused_bound(loss, shape, jnp.dtype(dtype), grads, chips)


CASES = [
    # (name, shape, dtype, layout, gradients)
    ("gemma", GEMMA, "float32", "dv", "both"),
    ("gemma", GEMMA, "float32", "vd", "hidden"),
    ("gemma", GEMMA, "bfloat16", "dv", "both"),
    ("llama", LLAMA, "float32", "dv", "both"),
    ("llama", LLAMA, "float32", "vd", "both"),
    ("llama", LLAMA, "bfloat16", "dv", "both"),
    ("llama", LLAMA, "bfloat16", "vd", "hidden"),
]


@pytest.mark.parametrize(
    "name, shape, dtype, layout, grads", CASES, ids=["-".join(c[:1] + c[2:]) for c in CASES]
)
def test_fused_loss_at_its_bound_on_tpu(name, shape, dtype, layout, grads):
    found, bound = compiled("linear_cross_entropy", shape, dtype, layout, grads)
    temp = found["temp_mib"]
    assert temp * MiB <= 1.25 * bound, f"{temp:.1f} MiB, bound {bound / MiB:.1f} MiB"
    assert temp <= CEILINGS[name, dtype], f"{temp:.1f} MiB > {CEILINGS[name, dtype]} MiB"
    assert not found["large_buffers"], found["large_buffers"]


@pytest.mark.parametrize(
    "loss, layout",
    [
        ("sharded_linear_cross_entropy", "vd"),
        ("sharded_linear_cross_entropy", "dv"),
        ("sharded_linear_distillation_loss", "dv"),
    ],
)
def test_sharded_loss_per_chip_on_the_mesh(loss, layout):
    # Llama 3 in bf16 on the v5e 2x4 mesh (tokens over 2 chips, vocabulary over 4): <= 320 MiB
    # per chip. Each chip's [d, V] classifier, [4096, 32064], is stored column-major (32064 is
    # not a multiple of 128): before jaxsoftmax/tiles/tpu_layout.py, a copy of it, 380 MiB
    # (the distillation: 631 MiB).
    found, bound = compiled(loss, LLAMA, "bfloat16", layout, "both")
    assert found["temp_mib"] * MiB <= 1.25 * bound, (found["temp_mib"], bound / MiB)
    assert found["temp_mib"] <= 320, found["temp_mib"]
    assert not found["large_buffers"], found["large_buffers"]


def test_the_large_buffer_check_finds_the_logits_path_s_float32_logits():
    # The check of large buffers can fail: the logits path at the benchmark's shape converts
    # the [N, V] bf16 logits to float32, and it reports that.
    shape = tpu_memory.SHAPES["benchmark"]
    programs, chips = tpu_memory.programs_for(
        "linear_cross_entropy", "v5e", shape, jnp.bfloat16, "vd", "both"
    )
    shapes = tpu_memory.large_shapes("linear_cross_entropy", shape, chips)
    found = tpu_memory.measure(programs["logits + optax"], shapes)
    assert found["large_buffers"], found


@pytest.mark.parametrize(
    "loss", ["sharded_linear_cross_entropy", "sharded_linear_distillation_loss"]
)
def test_the_classifier_gradient_is_summed_chunk_by_chunk_on_the_mesh(loss):
    """No all-reduce of a chip's whole ``[V / 4, d]`` classifier gradient: each chunk's is
    summed over the token shards in the loop (``summed_over_token_shards``). Moved out of the
    loop, it held the unsummed gradient beside the sum under libtpu 0.0.50.1 (379 MiB per
    chip); the check reads the program, so it holds under this libtpu too."""
    programs, chips = tpu_memory.programs_for(loss, "v5e", LLAMA, jnp.bfloat16, "dv", "both")
    hlo = tpu_memory.compile_program(*programs["jaxsoftmax"]).as_text()
    _, d, v = tpu_memory.local_shape(LLAMA, chips)
    reduced = re.findall(r"= \w+\[([\d,]+)\]\S* all-reduce(?:-start)?\(", hlo)
    whole = {f"{v},{d}", f"{d},{v}"}
    assert reduced and not whole & set(reduced), reduced


@pytest.mark.parametrize(
    "loss, ceiling", [("linear_token_log_probs", 400), ("sharded_linear_token_log_probs", 320)]
)
def test_token_log_probs_at_their_bound(loss, ceiling):
    """Reinforcement learning's scoring step (``mean(log p) + 0.01 mean(H)`` and both
    gradients) at Llama 3's shape in bf16, ``[d, V]``: on one chip, and per chip on the mesh."""
    found, bound = compiled(loss, LLAMA, "bfloat16", "dv", "both")
    assert found["temp_mib"] * MiB <= 1.25 * bound, (found["temp_mib"], bound / MiB)
    assert found["temp_mib"] <= ceiling, found["temp_mib"]
    assert not found["large_buffers"], found["large_buffers"]


def test_auto_recomputes_on_tpu_for_a_small_classifier():
    """At the benchmark's shape (2048, 512, 32768: ``V d = 2**24``) ``method="auto"`` takes
    the forward method on the CPU but recomputes on the TPU, chosen when lowered
    (``forward_on_the_cpu`` in jaxsoftmax/tiles/cross_entropy.py). With the forward method
    the TPU held its float32 ``[V, d]`` gradient: 64.5 MiB in bf16, where tokamax holds 0.6."""
    found, bound = compiled(
        "linear_cross_entropy", tpu_memory.SHAPES["benchmark"], "bfloat16", "dv", "both"
    )
    assert found["temp_mib"] * MiB <= 1.25 * bound, (found["temp_mib"], bound / MiB)
    assert found["temp_mib"] <= 4, found["temp_mib"]  # the [V, d] float32 gradient is 64 MiB
    assert not found["large_buffers"], found["large_buffers"]


@pytest.mark.parametrize(
    "shape, dtype",
    [("benchmark", "float32"), ("benchmark", "bfloat16"), ("gemma-2-2b", "bfloat16")],
)
def test_small_programs_keep_only_a_few_loop_numbers_in_main_memory(shape, dtype):
    """Where the tiles fit the TPU core's own memory (VMEM), what the program keeps in main
    memory is the loops' bookkeeping: scalars, loop-state tuples, the tuples of fusions that
    return two per-row vectors, asynchronous copies (512 bytes each, in slots 16 KiB apart:
    docs/performance.md). The loops now carry one number per row where they carried two (the
    running maximum starts finite; the backward reads ``lse = m + log s``), no mask when the
    chunks tile the batch and the vocabulary, one chunk start per step and no array of chunk
    indices (``jaxsoftmax/tiles/plan.py``). The hidden states' gradient alone, ``[d, V]``:
    0.40-0.49 MiB before, at most 0.28 now (libtpu 0.0.42.1)."""
    found, _ = compiled("linear_cross_entropy", tpu_memory.SHAPES[shape], dtype, "dv", "hidden")
    assert found["temp_mib"] <= 0.32, found["temp_mib"]


@pytest.mark.parametrize("loss", ["linear_cross_entropy", "linear_token_log_probs"])
def test_bf16_hidden_gradient_is_summed_per_token_chunk(loss):
    """The two-pass bf16 backward (jaxsoftmax/tiles/cross_entropy_backward.py): at Llama 3's
    shape no ``[N, d]`` float32 sum of the hidden states' gradient (256 MiB) is held, on one
    chip or per chip on the mesh (128 MiB there): a few MiB of tiles in VMEM and loop state."""
    found, _ = compiled(loss, LLAMA, "bfloat16", "dv", "both")
    assert found["temp_mib"] <= 4, found["temp_mib"]
    found, _ = compiled(f"sharded_{loss}", LLAMA, "bfloat16", "dv", "both")
    assert found["temp_mib"] <= 4, found["temp_mib"]


def test_bf16_distillation_hidden_gradients_are_summed_per_token_chunk():
    """The distillation's backward likewise (jaxsoftmax/tiles/distillation_backward.py):
    Llama 3's shape in bf16, both models' gradients, no ``[N, d]`` float32 sum (256 MiB per
    model on one chip, 128 per chip on the mesh)."""
    for loss in ("linear_distillation_loss", "sharded_linear_distillation_loss"):
        found, _ = compiled(loss, LLAMA, "bfloat16", "dv", "both")
        assert found["temp_mib"] <= 4, (loss, found["temp_mib"])

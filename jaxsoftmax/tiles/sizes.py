"""How large a tile of logits the fused loss holds at a time, per backend.

:func:`jaxsoftmax.linear_cross_entropy` visits the ``[N, V]`` logits one ``[T, Vc]`` tile
at a time (``T`` tokens by ``Vc`` classes). The tile sets both its memory and its speed:

* memory: in the backward a tile holds, besides the gradients it returns, the tile's logits
  and their gradient (``2 T Vc`` floats), a ``[Vc, d]`` slice of the classifier, that
  slice's gradient being summed and the next product's result (``3 Vc d``), and a
  ``[T, d]`` slice of the hidden states with its gradient's (``3 T d``), all in float32 for
  float32 inputs. At Gemma 2's shape (N 8192, d 2304, V 256000) the ``Vc d`` terms dominate:
  ``Vc = 4096`` cost 140 MiB there, ``Vc = 1024`` costs 49 MiB;
* speed: each tile runs three matrix products of ``T x d x Vc``, which reach full speed
  from a few hundred rows and columns on a CPU and about a thousand on an accelerator.

The sizes, ``(T, Vc)`` at most:

========  ==============  ==========================================================
backend   ``(T, Vc)``     from
========  ==============  ==========================================================
CPU       (1024, 1024)    measured here: temporary memory at Gemma 2's shape 49 MiB in
                          float32 (tokamax's chunked XLA loss: 53 MiB), the same time
                          as larger tiles at N 2048, d 512, V 32768
GPU       (1024, 2048)    tokamax's chunked XLA loss (``b_block_size=1024,
                          v_block_size=2048``) and Levanter's default block sizes
TPU       (1024, 1024)    Levanter's tuned table for vocabularies of 120k-131k on
                          TPU v4, v5 and v5p (``b_block_size=1024, v_block_size=1024``)
========  ==============  ==========================================================

From these, :func:`default_chunks` takes ``T = min(N, T_max)`` and for ``Vc`` the largest
divisor of ``V`` between ``Vc_max / 2`` and ``Vc_max`` (so the chunks tile the vocabulary
exactly and the classifier's gradient is assembled from them without updates in place),
or ``Vc_max`` when ``V`` has none (the last chunk then overlaps the one before, see
:mod:`jaxsoftmax.tiles.cross_entropy`), or ``V`` itself when it is smaller. On a TPU the
divisor must also be a multiple of 128 (:data:`LANES`): a TPU lays out an array's last
dimension in tiles of 128 lanes, and a chunk that cuts those tiles makes XLA:TPU keep the
classifier's gradient in a layout of its own and copy it at the end. At Llama 3's shape
(N 16384, d 4096, V 128256 = 128 x 1002) the divisor 1002 cost 2,004 MiB of temporary memory
in float32 (a ``[d, V]`` copy, or the stacked ``[V, d]`` chunks not laid in the output);
768 = 6 x 128 costs 0.6 MiB (compiled for TPU v5e, libtpu 0.0.42.1;
``experiments/tpu_memory.py``, ``tests/tpu/check_compiled_memory.py``).

A TPU's tile also says whether its program runs on the transposed classifier: when XLA:TPU
stores the classifier column-major (:mod:`jaxsoftmax.tiles.tpu_layout`).

The backend is chosen when the program is lowered (:func:`on_each_platform`, through
``jax.lax.platform_dependent``), not from the machine that traces it: a program exported
for ``"cuda"`` on a CPU gets the GPU's tiles. Sizes a caller passes win over all of these.
The GPU and TPU rows are the published tables' choices, not measured here (no accelerator
was at hand); ``experiments/benchmark.py`` on a GPU compares them with the naive path.
"""

from __future__ import annotations

import dataclasses

from jax import lax

from jaxsoftmax.tiles import tpu_layout

# The largest tile, (tokens, classes), for each backend jax.lax.platform_dependent names.
TILES = {
    "cpu": (1024, 1024),
    "cuda": (1024, 2048),
    "rocm": (1024, 2048),
    "tpu": (1024, 1024),
}
# A backend's vocabulary chunk is a multiple of this when it divides V (see the module's
# docstring): the TPU's lane width. Elsewhere any divisor.
LANES = {tpu_layout.PLATFORM: tpu_layout.LANES}
DEFAULT_PLATFORM = "cpu"  # what other backends get


def default_chunks(num_tokens: int, num_classes: int, platform: str = DEFAULT_PLATFORM):
    """``(token_chunk, vocab_chunk)`` for ``N`` tokens and ``V`` classes on ``platform``.

    >>> default_chunks(8192, 256000)  # 256000 = 250 * 1024
    (1024, 1024)
    >>> default_chunks(8192, 50257)  # GPT-2: 29 * 1733, no divisor in [512, 1024]: ragged
    (1024, 1024)
    >>> default_chunks(8192, 128256, "cuda")  # Llama 3: 128256 = 64 * 2004
    (1024, 2004)
    >>> default_chunks(16384, 128256, "tpu")  # 1002 divides it too, but cuts the TPU's lanes
    (1024, 768)
    >>> default_chunks(100, 700)
    (100, 700)
    """
    max_tokens, max_classes = TILES.get(platform, TILES[DEFAULT_PLATFORM])
    vocab_chunk = max(1, min(num_classes, max_classes))
    if num_classes > max_classes:
        divisors = range(max_classes, max_classes // 2 - 1, -1)
        lanes = LANES.get(platform, 1)
        vocab_chunk = next(
            (c for c in divisors if num_classes % c == 0 and c % lanes == 0), max_classes
        )
    return max(1, min(num_tokens, max_tokens)), vocab_chunk


def tiles_by_platform(num_tokens: int, num_classes: int, token_chunk=None, vocab_chunk=None,
                      layout: str = "vd", widths=()):  # fmt: skip
    """``((platform, token_chunk, vocab_chunk, transposed), ...)`` for every platform of
    :data:`TILES` and ``"default"``: the caller's sizes (when given) in place of the defaults,
    each at most ``N`` and ``V``, and whether the platform's program runs on the transposed
    classifiers (:func:`jaxsoftmax.tiles.tpu_layout.runs_transposed`, for classifiers in
    ``layout`` of hidden widths ``widths``)."""
    platforms = (*TILES, "default")
    found = []
    for platform in platforms:
        tokens, classes = default_chunks(num_tokens, num_classes, platform)
        found.append(
            (
                platform,
                min(token_chunk or tokens, max(num_tokens, 1)),
                min(vocab_chunk or classes, max(num_classes, 1)),
                tpu_layout.runs_transposed(platform, layout, widths, num_classes),
            )
        )
    return tuple(found)


def on_each_platform(function, plan, *args):
    """``function(*args, plan=...)`` with the tile of the platform it is lowered for.

    ``plan`` is a dataclass with ``token_chunk``, ``vocab_chunk``, ``transposed`` and
    ``tiles`` (from :func:`tiles_by_platform`); each platform's variant gets its own. Platforms
    that share them share one variant, and when all do, nothing is chosen at lowering.
    """
    variants = {}
    branches = {}
    for platform, *tile in plan.tiles:
        if tuple(tile) not in variants:
            tokens, classes, transposed = tile
            sized = dataclasses.replace(
                plan, token_chunk=tokens, vocab_chunk=classes, transposed=transposed
            )
            variants[tuple(tile)] = _bound(function, sized)
        branches[platform] = variants[tuple(tile)]
    if len(variants) <= 1:
        return function(*args, plan=plan)
    default = branches.pop("default")
    return lax.platform_dependent(*args, default=default, **branches)


def _bound(function, plan):
    return lambda *args: function(*args, plan=plan)


def chosen_tiles(num_tokens: int, num_classes: int, tiles, widths=()) -> tuple[tuple, int, int]:
    """``(by_platform, token_chunk, vocab_chunk)`` for a call's tiling ``tiles`` (a
    :class:`~jaxsoftmax.checks.linear_head.TileOptions`) of classifiers for hidden widths
    ``widths``: each backend's tile, and the one the program is traced with."""
    by_platform = tiles_by_platform(
        num_tokens, num_classes, tiles.token_chunk, tiles.vocab_chunk, tiles.layout, widths
    )
    _, token_chunk, vocab_chunk, _ = next(t for t in by_platform if t[0] == "default")
    return by_platform, token_chunk, vocab_chunk

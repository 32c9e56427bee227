"""The fused losses on a TPU run on the classifier in the memory order the TPU stored it.

A TPU stores a 2-D array in tiles of 8 rows by 128 lanes, and XLA:TPU picks for each array
the order that pads it least: for ``[rows, cols]``, row-major (``{1,0}``, the columns in the
lanes) unless column-major (``{0,1}``, the rows in the lanes) pads less
(:func:`stored_column_major`). A ``[d, V]`` classifier whose ``V`` is not a multiple of 128
(a vocabulary split over devices: Llama 3's 128256 classes over 4 chips are 32064 each) is
therefore stored column-major: it is, in memory, the ``[V, d]`` classifier. The fused loss's
chunk loops read it row-major, so without this module XLA:TPU copies the whole classifier
into that order before the loops, and the classifier's gradient out of it after: at Llama
3's shape on the TPU v5e 2x4 mesh (bf16, tokens over 2 chips, vocabulary over 4), 380 MiB of
temporary memory per chip, a ``bf16[4096,32064]`` copy in it (libtpu 0.0.42.1, JAX 0.10.2;
compiled ahead of time for a topology without devices).

The workaround: the TPU's program transposes such a classifier (and computes in the other
layout, ``"vd"`` for ``"dv"``), and transposes the classifier's gradient back. Both
transposes only rename the stored order, so XLA:TPU makes them free; the loops read the
classifier where it lies: 128 MiB per chip at that shape. The values are the same (the same
products on the same numbers). :func:`jaxsoftmax.tiles.sizes.tiles_by_platform` decides it
per backend (:func:`runs_transposed`), and the forward and backward of
:mod:`jaxsoftmax.tiles.cross_entropy` and :mod:`jaxsoftmax.tiles.distillation` apply it
(:func:`as_computed`, :func:`as_given`); it is chosen when the program is lowered, so a
program lowered for the CPU or a GPU never contains it. Pinned by
``test_classifier_stored_column_major_is_transposed_only_on_the_tpu`` in
tests/test_tpu_programs.py and by ``test_sharded_loss_per_chip_on_the_mesh`` in
tests/tpu/check_compiled_memory.py. Can go when XLA:TPU reads a column-major operand of a
chunk loop in place.
"""

from __future__ import annotations

import dataclasses

# XLA:TPU's tile of a 2-D array: 8 rows (sublanes) by 128 lanes, in every dtype it lays out.
SUBLANES, LANES = 8, 128
PLATFORM = "tpu"


def _padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def stored_column_major(rows: int, cols: int) -> bool:
    """Whether XLA:TPU stores a ``[rows, cols]`` array column-major: when that pads it less,
    ``ceil8(cols) ceil128(rows) < ceil8(rows) ceil128(cols)`` (row-major on a tie).

    >>> stored_column_major(4096, 32064)  # 32064 = 250.5 x 128
    True
    >>> stored_column_major(4096, 128256), stored_column_major(4100, 32064)
    (False, False)
    """
    column_major = _padded(cols, SUBLANES) * _padded(rows, LANES)
    return column_major < _padded(rows, SUBLANES) * _padded(cols, LANES)


def runs_transposed(platform: str, layout: str, widths, num_classes: int) -> bool:
    """Whether ``platform``'s program runs on the transposed classifiers: on a TPU, when every
    classifier (``[V, d]`` for ``"vd"``, ``[d, V]`` for ``"dv"``, ``d`` in ``widths``) is
    stored column-major."""
    if platform != PLATFORM or not widths:
        return False
    shapes = [(num_classes, d) if layout == "vd" else (d, num_classes) for d in widths]
    return all(stored_column_major(*shape) for shape in shapes)


def other_layout(layout: str) -> str:
    return "dv" if layout == "vd" else "vd"


def as_computed(classifiers, plan):
    """``(classifiers, plan)`` as the program computes them: transposed, in the other layout,
    when ``plan.transposed``; as given otherwise. ``classifiers`` is a tuple of arrays."""
    if not plan.transposed:
        return classifiers, plan
    swapped = dataclasses.replace(plan, layout=other_layout(plan.layout), transposed=False)
    return tuple(c.T for c in classifiers), swapped


def as_given(gradient, plan):
    """A classifier's gradient in the layout it was given in (``plan`` as given, before
    :func:`as_computed`)."""
    return gradient.T if plan.transposed and gradient is not None else gradient

"""What the tests of the resumable scripts check of their checkpoints.

Not a test module: the scripts' tests (language_model.py, distill.py, reinforce.py,
preference.py) import it, as they import ``sample`` and ``reference``.
"""

from __future__ import annotations

import numpy as np


def assert_same_parameters(whole, resumed) -> None:
    """The ``checkpoint.npz`` of the folders ``whole`` and ``resumed`` hold the same parameter
    leaves (``leaf_*``), bit for bit: an interrupted and resumed run lost nothing."""
    with np.load(f"{whole}/checkpoint.npz") as one, np.load(f"{resumed}/checkpoint.npz") as two:
        leaves = [key for key in one.files if key.startswith("leaf_")]
        assert leaves and sorted(leaves) == sorted(k for k in two.files if k.startswith("leaf_"))
        for key in leaves:
            np.testing.assert_array_equal(one[key], two[key])

"""Small classification datasets for the network in :mod:`jaxsoftmax.mlp`, as NumPy arrays.

Every loader is deterministic in its ``seed`` and returns features ``float32 [N, D]`` and integer
labels ``int32 [N]`` in ``[0, num_classes)``. :func:`load` turns one of them into a
:class:`Dataset` with a train/test split, optional standardisation and checked labels.

- ``spiral``: CS231n's "minimal neural network case study" generator (K arms of N points).
- ``moons``, ``circles``: scikit-learn's generators.
- ``iris``, ``digits``: scikit-learn's bundled copies (read from disk, never downloaded).

The two toy inputs of the derivation's source texts (docs/derivation.md),
:func:`toy_five_examples_four_features` and :func:`toy_one_example_two_features`, are separate:
they are too small to split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DATASETS = ("spiral", "moons", "circles", "iris", "digits")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split with integer labels, ready for :func:`jaxsoftmax.training.train`.

    Attributes:
      name: the loader's name, e.g. ``"spiral"``.
      x_train, y_train: ``float32 [N_train, D]`` and ``int32 [N_train]``.
      x_test, y_test: ``float32 [N_test, D]`` and ``int32 [N_test]``.
      num_classes: labels lie in ``[0, num_classes)``.
      split: how the test set was made, in words (stored in ``metrics.json``).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    split: str

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            check_features_and_labels(
                getattr(self, f"x_{part}"),
                getattr(self, f"y_{part}"),
                self.num_classes,
                x_name=f"x_{part}",
                y_name=f"y_{part}",
            )
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(
                f"x_train has {self.x_train.shape[1]} features but x_test has "
                f"{self.x_test.shape[1]}; both splits need the same width."
            )

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def check_features_and_labels(
    x: np.ndarray, y: np.ndarray, num_classes: int, *, x_name: str = "x", y_name: str = "y"
) -> None:
    """Raises ``ValueError`` naming the argument unless ``x: [N, D]``, ``y: [N]`` integers in range.

    >>> check_features_and_labels(np.zeros((3, 2)), np.array([0, 1, 3]), 3)
    Traceback (most recent call last):
    ...
    ValueError: y holds labels outside [0, 3): 3 at index 2; labels must be class indices 0..2.
    """
    if np.ndim(x) != 2:
        raise ValueError(
            f"{x_name} has shape {np.shape(x)}; expected [num_examples, num_features]."
        )
    if np.ndim(y) != 1:
        raise ValueError(
            f"{y_name} has shape {np.shape(y)}; expected [num_examples] class indices."
        )
    if len(x) != len(y):
        raise ValueError(
            f"{x_name} has {len(x)} examples but {y_name} has {len(y)} labels; they must match."
        )
    if not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise ValueError(
            f"{y_name} has dtype {np.asarray(y).dtype}; expected integer class indices."
        )
    outside = (y < 0) | (y >= num_classes)
    if np.any(outside):
        index = int(np.argmax(outside))
        raise ValueError(
            f"{y_name} holds labels outside [0, {num_classes}): {int(y[index])} at index {index}; "
            f"labels must be class indices 0..{num_classes - 1}."
        )


def spiral(
    points_per_class: int = 100, num_classes: int = 3, *, noise: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """CS231n's spiral: ``num_classes`` arms of ``points_per_class`` points in the plane.

    For arm ``j`` and ``i = 0..N-1``: ``r_i = i / (N - 1)``,
    ``t_i = 4 j + 4 i / (N - 1) + noise * eps_i`` with ``eps_i ~ Normal(0, 1)``, and the point is
    ``(r_i sin t_i, r_i cos t_i)`` with label ``j``. Not linearly separable: a linear softmax
    classifier reaches about 0.5 training accuracy on three arms, one hidden layer about 0.98.

    >>> x, y = spiral(100, 3)
    >>> x.shape, y.shape, np.bincount(y).tolist()
    ((300, 2), (300,), [100, 100, 100])
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((points_per_class * num_classes, 2), np.float32)
    y = np.zeros(points_per_class * num_classes, np.int32)
    for arm in range(num_classes):
        rows = slice(points_per_class * arm, points_per_class * (arm + 1))
        radius = np.linspace(0.0, 1.0, points_per_class)
        angle = np.linspace(arm * 4.0, (arm + 1) * 4.0, points_per_class)
        angle = angle + noise * rng.standard_normal(points_per_class)
        x[rows] = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
        y[rows] = arm
    return x, y


def _sklearn_datasets() -> Any:
    try:
        import sklearn.datasets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "moons, circles, iris and digits need scikit-learn: pip install 'jaxsoftmax[experiments]'"
        ) from error
    return sklearn.datasets


def moons(num_examples: int = 400, *, noise: float = 0.2, seed: int = 0):
    """Two interleaving half circles (``sklearn.datasets.make_moons``), labels 0 and 1.

    >>> x, y = moons(10)
    >>> x.shape, sorted(set(y.tolist()))
    ((10, 2), [0, 1])
    """
    x, y = _sklearn_datasets().make_moons(num_examples, noise=noise, random_state=seed)
    return x.astype(np.float32), y.astype(np.int32)


def circles(num_examples: int = 400, *, noise: float = 0.1, factor: float = 0.5, seed: int = 0):
    """A small circle inside a large one (``sklearn.datasets.make_circles``), labels 0 and 1."""
    x, y = _sklearn_datasets().make_circles(
        num_examples, noise=noise, factor=factor, random_state=seed
    )
    return x.astype(np.float32), y.astype(np.int32)


def iris():
    """Fisher's iris: 150 examples, 4 features, 3 classes (scikit-learn's bundled copy)."""
    bunch = _sklearn_datasets().load_iris()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int32)


def digits():
    """8 x 8 handwritten digits: 1797 examples, 64 features in [0, 16], 10 classes (bundled)."""
    bunch = _sklearn_datasets().load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int32)


def toy_five_examples_four_features(seed: int = 0):
    """The blog post's input (docs/derivation.md): ``X [5, 4]`` and five labels of 3 classes.

    The text leaves the values open; these are standard normal draws and labels
    ``[0, 1, 2, 0, 1]`` so that every class occurs.

    >>> x, y = toy_five_examples_four_features()
    >>> x.shape, y.tolist()
    ((5, 4), [0, 1, 2, 0, 1])
    """
    x = np.random.default_rng(seed).standard_normal((5, 4)).astype(np.float32)
    return x, np.array([0, 1, 2, 0, 1], np.int32)


def toy_one_example_two_features(seed: int = 0):
    """The Q&A thread's input (docs/derivation.md): one example ``x [1, 2]``, label 1 of 2 classes.

    >>> x, y = toy_one_example_two_features()
    >>> x.shape, y.tolist()
    ((1, 2), [1])
    """
    x = np.random.default_rng(seed).standard_normal((1, 2)).astype(np.float32)
    return x, np.array([1], np.int32)


def split(
    x: np.ndarray, y: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A deterministic shuffled split: ``(x_train, y_train, x_test, y_test)``.

    The last ``round(test_fraction * N)`` examples of a ``seed``-determined permutation form the
    test set, so the same seed always gives the same split.

    >>> x_train, y_train, x_test, y_test = split(np.zeros((10, 2)), np.arange(10), seed=1)
    >>> len(y_train), len(y_test)
    (8, 2)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1.")
    order = np.random.default_rng(seed).permutation(len(x))
    num_test = max(1, int(round(test_fraction * len(x))))
    train, test = order[:-num_test], order[-num_test:]
    return x[train], y[train], x[test], y[test]


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subtracts the training mean and divides by the training standard deviation, per feature.

    Constant features (standard deviation 0, e.g. corner pixels of ``digits``) are only centred.

    >>> a, b = standardize(np.array([[0.0], [2.0]]), np.array([[4.0]]))
    >>> a.ravel().tolist(), b.ravel().tolist()
    ([-1.0, 1.0], [3.0])
    """
    mean = x_train.mean(axis=0, keepdims=True)
    std = x_train.std(axis=0, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return ((x_train - mean) / std).astype(x_train.dtype), ((x_test - mean) / std).astype(
        x_test.dtype
    )


def _check_load_options(name: str, num_examples: int | None, num_classes: int | None) -> None:
    """``ValueError`` naming the option of :func:`load` that ``name`` does not take."""
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is not known; expected one of {', '.join(DATASETS)}.")
    if num_classes is not None and name != "spiral":
        raise ValueError(f"num_classes={num_classes} can only be chosen for spiral, not {name!r}.")
    if num_examples is not None and name in ("iris", "digits"):
        raise ValueError(
            f"num_examples={num_examples} cannot be chosen for {name!r}: its size is fixed; "
            "leave it unset (it applies to spiral, moons and circles)."
        )
    # spiral draws num_examples per class; moons and circles split num_examples in two
    fewest = 1 if name == "spiral" else 2
    if num_examples is not None and num_examples < fewest:
        raise ValueError(
            f"num_examples={num_examples} is too few for {name!r}: expected at least {fewest} "
            + ("point per class." if name == "spiral" else "examples, one for each split.")
        )


def load(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardized: bool = False,
    num_examples: int | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """One of :data:`DATASETS` as a checked :class:`Dataset`.

    ``spiral`` follows CS231n's case study, which trains and reports on the same 300 points: the
    training split is the whole spiral drawn with ``seed`` and the test split is a second spiral
    of the same size drawn with ``seed + 1``. The other datasets are split by :func:`split`.

    Args:
      name: one of ``"spiral"``, ``"moons"``, ``"circles"``, ``"iris"``, ``"digits"``.
      seed: fixes the generated points and the split.
      test_fraction: the held-out share (not used by ``spiral``).
      standardized: whether to standardise the features with the training statistics.
      num_examples: points per class for ``spiral`` (default 100), total for ``moons`` and
        ``circles`` (default 400); not accepted by ``iris`` and ``digits``.
      num_classes: arms of ``spiral`` (default 3); not accepted by the others.

    >>> dataset = load("spiral")
    >>> dataset.x_train.shape, dataset.x_test.shape, dataset.num_classes
    ((300, 2), (300, 2), 3)
    >>> load("mnist")
    Traceback (most recent call last):
    ...
    ValueError: dataset 'mnist' is not known; expected one of spiral, moons, circles, iris, digits.
    """
    _check_load_options(name, num_examples, num_classes)
    if name == "spiral":
        per_class = 100 if num_examples is None else num_examples
        arms = 3 if num_classes is None else num_classes
        x_train, y_train = spiral(per_class, arms, seed=seed)
        x_test, y_test = spiral(per_class, arms, seed=seed + 1)
        description = (
            f"train: the whole spiral drawn with seed {seed} (CS231n trains and reports on it); "
            f"test: a second spiral of the same size drawn with seed {seed + 1}"
        )
    else:
        if name in ("moons", "circles"):
            generator = moons if name == "moons" else circles
            x, y = generator(400 if num_examples is None else num_examples, seed=seed)
        else:
            x, y = iris() if name == "iris" else digits()
        x_train, y_train, x_test, y_test = split(x, y, test_fraction=test_fraction, seed=seed)
        description = f"shuffled with seed {seed}; the last {test_fraction:g} held out for test"
    if standardized:
        x_train, x_test = standardize(x_train, x_test)
        description += "; features standardised with the training mean and standard deviation"
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=int(max(y_train.max(), y_test.max()) + 1),
        split=description,
    )


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardized: bool = False,
    name: str = "arrays",
) -> Dataset:
    """Your own features and integer labels as a checked, split :class:`Dataset`.

    Lengths and label range are checked before anything else, so a bad file fails at load time.

    >>> from_arrays(np.zeros((4, 2)), np.array([0, 1, 1]), num_classes=2)
    Traceback (most recent call last):
    ...
    ValueError: x has 4 examples but y has 3 labels; they must match.
    """
    x, y = np.asarray(x), np.asarray(y)
    check_features_and_labels(x, y, num_classes)
    x_train, y_train, x_test, y_test = split(
        x.astype(np.float32), y.astype(np.int32), test_fraction=test_fraction, seed=seed
    )
    if standardized:
        x_train, x_test = standardize(x_train, x_test)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        split=f"shuffled with seed {seed}; the last {test_fraction:g} held out for test",
    )

"""jaxsoftmax.data: the generators, the splits and the load-time checks."""

import numpy as np
import pytest

from jaxsoftmax import data


class TestSpiral:
    def test_follows_the_case_study_formula(self):
        x, y = data.spiral(50, 4, noise=0.2, seed=3)
        assert x.shape == (200, 2) and x.dtype == np.float32
        assert y.dtype == np.int32 and np.bincount(y).tolist() == [50] * 4
        for arm in range(4):
            points = x[y == arm]
            # the radius is linspace(0, 1, N) whatever the noise on the angle
            np.testing.assert_allclose(
                np.hypot(points[:, 0], points[:, 1]), np.linspace(0, 1, 50), atol=1e-6
            )
        noiseless, _ = data.spiral(50, 4, noise=0.0)
        angle = np.linspace(4.0, 8.0, 50)
        np.testing.assert_allclose(
            noiseless[50:100],
            np.linspace(0, 1, 50)[:, None] * np.stack([np.sin(angle), np.cos(angle)], 1),
            atol=1e-6,
        )

    def test_is_deterministic_in_the_seed(self):
        np.testing.assert_array_equal(data.spiral(seed=1)[0], data.spiral(seed=1)[0])
        assert not np.array_equal(data.spiral(seed=1)[0], data.spiral(seed=2)[0])


class TestLoad:
    @pytest.mark.parametrize(
        "name, features, classes, total",
        [
            ("spiral", 2, 3, 600),
            ("moons", 2, 2, 400),
            ("circles", 2, 2, 400),
            ("iris", 4, 3, 150),
            ("digits", 64, 10, 1797),
        ],
    )
    def test_shapes_dtypes_and_labels(self, name, features, classes, total):
        dataset = data.load(name)
        assert dataset.num_features == features and dataset.num_classes == classes
        assert len(dataset.y_train) + len(dataset.y_test) == total
        for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)):
            assert x.dtype == np.float32 and y.dtype == np.int32
            assert y.min() >= 0 and y.max() < classes

    def test_spiral_trains_on_the_whole_spiral_and_tests_on_another(self):
        dataset = data.load("spiral", seed=5)
        np.testing.assert_array_equal(dataset.x_train, data.spiral(seed=5)[0])
        np.testing.assert_array_equal(dataset.x_test, data.spiral(seed=6)[0])
        assert "seed 6" in dataset.split

    @pytest.mark.parametrize("name", ["moons", "iris"])
    def test_splits_are_deterministic_and_disjoint(self, name):
        a, b, c = data.load(name, seed=0), data.load(name, seed=0), data.load(name, seed=1)
        np.testing.assert_array_equal(a.x_test, b.x_test)
        assert not np.array_equal(a.y_test, c.y_test) or not np.array_equal(a.x_test, c.x_test)
        rows = {tuple(r) for r in a.x_train.tolist()}
        assert not any(tuple(r) in rows for r in a.x_test.tolist())

    def test_standardization_uses_training_statistics(self):
        dataset = data.load("iris", standardized=True)
        np.testing.assert_allclose(dataset.x_train.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(dataset.x_train.std(axis=0), 1.0, rtol=1e-4)
        digits = data.load("digits", standardized=True)  # constant pixels stay finite
        assert np.all(np.isfinite(digits.x_train)) and np.all(np.isfinite(digits.x_test))

    def test_unknown_dataset_names_the_choices(self):
        with pytest.raises(ValueError, match="'cifar'.*spiral, moons, circles, iris, digits"):
            data.load("cifar")

    def test_options_that_do_not_apply_are_refused(self):
        with pytest.raises(ValueError, match="num_classes=4 can only be chosen for spiral"):
            data.load("moons", num_classes=4)
        with pytest.raises(ValueError, match="num_examples=10 cannot be chosen for 'iris'.*unset"):
            data.load("iris", num_examples=10)

    @pytest.mark.parametrize("name, too_few", [("spiral", 0), ("moons", 1), ("circles", -5)])
    def test_too_few_examples_are_refused(self, name, too_few):
        with pytest.raises(ValueError, match=f"num_examples={too_few} is too few for '{name}'"):
            data.load(name, num_examples=too_few)


class TestLoadTimeChecks:
    def test_mismatched_lengths(self):
        with pytest.raises(ValueError, match="x has 5 examples but y has 4 labels"):
            data.from_arrays(np.zeros((5, 2)), np.zeros(4, np.int64), num_classes=2)

    @pytest.mark.parametrize("bad_label, index", [(3, 1), (-1, 1)])
    def test_labels_out_of_range(self, bad_label, index):
        labels = np.array([0, bad_label, 1, 2])
        with pytest.raises(ValueError, match=rf"outside \[0, 3\): {bad_label} at index {index}"):
            data.from_arrays(np.zeros((4, 2)), labels, num_classes=3)

    def test_float_labels_and_bad_ranks(self):
        with pytest.raises(ValueError, match="y has dtype float64; expected integer"):
            data.from_arrays(np.zeros((2, 2)), np.array([0.0, 1.0]), num_classes=2)
        with pytest.raises(ValueError, match=r"x has shape \(4,\)"):
            data.from_arrays(np.zeros(4), np.array([0, 1, 0, 1]), num_classes=2)

    def test_dataset_checks_both_splits(self):
        with pytest.raises(ValueError, match="y_test holds labels outside"):
            data.Dataset(
                "d",
                np.zeros((2, 2), np.float32),
                np.array([0, 1]),
                np.zeros((1, 2), np.float32),
                np.array([2]),
                num_classes=2,
                split="",
            )

    def test_good_arrays_become_a_split_dataset(self):
        x, y = data.spiral(20, 3)
        dataset = data.from_arrays(x, y, num_classes=3, test_fraction=0.25)
        assert len(dataset.y_test) == 15 and len(dataset.y_train) == 45


def test_toy_inputs_of_the_seeds():
    x, y = data.toy_five_examples_four_features()
    assert x.shape == (5, 4) and set(y.tolist()) == {0, 1, 2}
    x, y = data.toy_one_example_two_features()
    assert x.shape == (1, 2) and y.shape == (1,) and y[0] in (0, 1)

"""Bundled data sets: shapes, ranges, splits, seeds, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from ekfac_laplace.evaluation.data import (
    DataSplits,
    _digits_split_indices,
    load_diabetes_splits,
    load_digits_splits,
    regression_grid,
    toy_function,
    toy_regression_1d,
    two_moons,
)

SPLITS = ("train", "val", "test")


def _tensors(splits: DataSplits) -> list[torch.Tensor]:
    return [t for name in SPLITS for t in getattr(splits, name).tensors]


def _same(a: DataSplits, b: DataSplits) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_digits_splits(seed=0)


# ------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_ranges(digits: DataSplits):
    assert digits.likelihood == "classification"
    assert digits.n_outputs == 10
    assert digits.input_shape == (1, 8, 8)
    assert "digits" in digits.description
    for name in SPLITS:
        images, targets = getattr(digits, name).tensors
        assert images.shape[1:] == (1, 8, 8)
        assert images.dtype == torch.float32
        assert targets.dtype == torch.long
        assert targets.shape == (images.shape[0],)
        assert images.min() >= 0 and images.max() <= 1
        assert set(targets.unique().tolist()) == set(range(10))
    assert digits.train.tensors[0].max() == 1.0  # 16 / 16
    sizes = [len(getattr(digits, name)) for name in SPLITS]
    assert sum(sizes) == 1797
    assert sizes[2] == pytest.approx(0.25 * 1797, abs=1)
    assert sizes[1] == pytest.approx(0.15 * 1797, abs=1)
    assert load_digits_splits(dtype=torch.float64).test.tensors[0].dtype == (
        torch.float64
    )


def test_digits_stratified(digits: DataSplits):
    proportions = [
        torch.bincount(getattr(digits, name).tensors[1], minlength=10)
        / len(getattr(digits, name))
        for name in SPLITS
    ]
    for other in proportions[1:]:
        assert (other - proportions[0]).abs().max() < 0.01


def test_digits_splits_disjoint_and_cover_everything():
    train, val, test = _digits_split_indices(seed=0)
    everything = np.concatenate([train, val, test])
    assert len(everything) == len(set(everything.tolist())) == 1797
    assert set(everything.tolist()) == set(range(1797))
    # The public split holds exactly the images of load_digits (as a multiset).
    splits = load_digits_splits(seed=0, dtype=torch.float64)
    ours = torch.cat([getattr(splits, n).tensors[0] for n in SPLITS]).reshape(-1, 64)
    reference = torch.as_tensor(load_digits().data / 16.0)

    def rows_sorted(rows: torch.Tensor) -> np.ndarray:
        array = rows.numpy()
        return array[np.lexsort(array.T[::-1])]

    np.testing.assert_array_equal(rows_sorted(ours), rows_sorted(reference))
    # Targets follow their images.
    digits = load_digits()
    np.testing.assert_array_equal(splits.test.tensors[1].numpy(), digits.target[test])
    np.testing.assert_allclose(
        splits.test.tensors[0].reshape(-1, 64).numpy(), digits.data[test] / 16.0
    )


def test_digits_determinism(digits: DataSplits):
    assert _same(digits, load_digits_splits(seed=0))
    assert not _same(digits, load_digits_splits(seed=1))


# --------------------------------------------------------------------- regression


def test_toy_regression_gap():
    splits = toy_regression_1d(150, seed=0, noise_std=0.1)
    assert splits.likelihood == "regression"
    assert splits.n_outputs == 1 and splits.input_shape == (1,)
    for name in SPLITS:
        x, y = getattr(splits, name).tensors
        assert x.ndim == 2 and x.shape[1] == 1 and y.shape == x.shape
        assert x.dtype == y.dtype == torch.float32
        assert (x >= -4).all() and (x <= 4).all()
    assert len(splits.train) == 150
    for name in ("train", "val"):
        x = getattr(splits, name).tensors[0]
        assert not ((x > -1) & (x < 1)).any()
    test_x = splits.test.tensors[0]
    in_gap = (test_x > -1) & (test_x < 1)
    assert in_gap.sum() > 0.15 * len(test_x)
    # Targets are the documented function plus noise of the given size.
    x, y = splits.train.tensors
    residual = y - toy_function(x)
    assert residual.std() == pytest.approx(0.1, rel=0.25)


def test_toy_regression_determinism_and_options():
    first = toy_regression_1d(seed=0)
    assert _same(first, toy_regression_1d(seed=0))
    assert not _same(first, toy_regression_1d(seed=1))
    custom = toy_regression_1d(
        40, gap=(0.0, 2.0), domain=(-1.0, 3.0), noise_std=0.0, dtype=torch.float64
    )
    x, y = custom.train.tensors
    assert x.dtype == torch.float64
    assert not ((x > 0) & (x < 2)).any() and (x >= -1).all() and (x <= 3).all()
    torch.testing.assert_close(y, toy_function(x))


def test_regression_grid():
    grid = regression_grid((-4.0, 4.0), 400, margin=1.0)
    assert grid.shape == (400, 1) and grid.dtype == torch.float32
    assert grid[0, 0] == -5.0 and grid[-1, 0] == 5.0
    assert (grid.diff(dim=0) > 0).all()
    assert regression_grid(n=10, margin=0.0, dtype=torch.float64)[-1, 0] == 4.0


def test_diabetes_standardised_on_train():
    splits = load_diabetes_splits(seed=0)
    assert splits.likelihood == "regression" and splits.n_outputs == 1
    assert splits.input_shape == (10,)
    assert sum(len(getattr(splits, name)) for name in SPLITS) == 442
    x, y = splits.train.tensors
    assert x.shape[1] == 10 and y.shape == (len(x), 1)
    assert x.dtype == y.dtype == torch.float32
    for values in (x.double(), y.double()):
        zeros = torch.zeros(values.shape[1], dtype=torch.float64)
        torch.testing.assert_close(values.mean(0), zeros, atol=1e-5, rtol=0)
        torch.testing.assert_close(values.std(0, unbiased=False), zeros + 1)
    # Held-out sets use the training statistics, so they are only close to standard.
    test_y = splits.test.tensors[1]
    assert test_y.mean().abs() > 1e-4
    assert test_y.mean().abs() < 0.5
    assert _same(splits, load_diabetes_splits(seed=0))
    assert not _same(splits, load_diabetes_splits(seed=1))


def test_two_moons():
    splits = two_moons(200, seed=0)
    assert splits.likelihood == "classification" and splits.n_outputs == 2
    assert splits.input_shape == (2,)
    sizes = [len(getattr(splits, name)) for name in SPLITS]
    assert sizes[0] == 200
    for name in SPLITS:
        x, y = getattr(splits, name).tensors
        assert x.shape[1] == 2 and x.dtype == torch.float32
        assert y.dtype == torch.long and set(y.tolist()) == {0, 1}
    # Val and test are fresh draws, not copies of the training points.
    assert not torch.equal(splits.train.tensors[0][:50], splits.test.tensors[0][:50])
    assert _same(splits, two_moons(200, seed=0))
    assert not _same(splits, two_moons(200, seed=1))


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, "val_fraction must lie strictly between 0 and 1"),
        ({"val_fraction": 1.0}, "val_fraction must lie strictly between 0 and 1"),
        ({"test_fraction": -0.1}, "test_fraction must lie strictly between 0 and 1"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be below 1"),
        ({"seed": -1}, "seed must lie in"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"dtype": torch.long}, "dtype must be a floating torch dtype"),
    ],
)
@pytest.mark.parametrize("loader", [load_digits_splits, load_diabetes_splits])
def test_split_errors(loader, kwargs, match):
    with pytest.raises(ValueError, match=match):
        loader(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "n_train must be at least 1, got 0"),
        ({"noise_std": -0.1}, "noise_std must be a finite non-negative"),
        ({"domain": (4.0, -4.0)}, "domain must be a finite interval"),
        ({"gap": (1.0, -1.0)}, "gap must be a pair"),
        ({"gap": (-5.0, 0.0)}, r"gap \(-5.0, 0.0\) must lie inside domain"),
        ({"gap": (-4.0, 4.0)}, "covers the whole domain"),
    ],
)
def test_toy_regression_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy_regression_1d(**kwargs)


def test_grid_and_moons_errors():
    with pytest.raises(ValueError, match="n must be at least 1, got 0"):
        regression_grid(n=0)
    with pytest.raises(ValueError, match="margin must be a finite non-negative"):
        regression_grid(margin=-1.0)
    with pytest.raises(ValueError, match="domain must be a finite interval"):
        regression_grid((1.0, 1.0))
    with pytest.raises(ValueError, match="n_train must be at least 2, got 1"):
        two_moons(1)
    with pytest.raises(ValueError, match="noise must be a finite non-negative"):
        two_moons(noise=-0.2)


def test_noisy_digits_few_examples_and_noisy_labels_in_every_split():
    from ekfac_laplace.evaluation.data import load_noisy_digits_splits

    clean = load_digits_splits(0)
    noisy = load_noisy_digits_splits(0, n_train=300, label_noise=0.2)
    assert len(noisy.train) == 300 and noisy.n_outputs == 10
    assert torch.bincount(noisy.train.tensors[1], minlength=10).min() > 15
    for split in ("val", "test"):
        images, labels = getattr(noisy, split).tensors
        clean_images, clean_labels = getattr(clean, split).tensors
        assert torch.equal(images, clean_images)  # the same images
        flipped = (labels != clean_labels).float().mean()
        assert 0.12 < flipped < 0.28  # every flipped label changed class
    # the training images are a subset of the digits training images
    clean_train = {tuple(x.flatten().tolist()) for x in clean.train.tensors[0]}
    assert all(
        tuple(x.flatten().tolist()) in clean_train for x in noisy.train.tensors[0]
    )
    again = load_noisy_digits_splits(0, n_train=300, label_noise=0.2)
    assert torch.equal(again.test.tensors[1], noisy.test.tensors[1])
    other = load_noisy_digits_splits(1, n_train=300, label_noise=0.2)
    assert not torch.equal(other.train.tensors[1], noisy.train.tensors[1])
    exact = load_noisy_digits_splits(0, n_train=len(clean.train), label_noise=0.0)
    assert torch.equal(exact.test.tensors[1], clean.test.tensors[1])
    assert "20% of the labels" in noisy.description
    with pytest.raises(ValueError, match="n_train must be between 10"):
        load_noisy_digits_splits(0, n_train=5)
    with pytest.raises(ValueError, match="label_noise must be in"):
        load_noisy_digits_splits(0, label_noise=0.95)

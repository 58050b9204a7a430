"""Bundled data sets, shifts and OOD patches: shapes, ranges, seeds, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from ekfac_laplace.evaluation.data import (
    SHIFTS,
    DataSplits,
    _digits_split_indices,
    add_pixel_noise,
    load_diabetes_splits,
    load_digits_splits,
    load_ood_patches,
    regression_grid,
    rotate_images,
    shifted,
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


# ------------------------------------------------------------------------- shifts


def test_rotation_by_zero_is_identity(digits: DataSplits):
    images = digits.test.tensors[0]
    torch.testing.assert_close(rotate_images(images, 0.0), images, atol=1e-6, rtol=0)


def test_rotation_by_90_is_rot90(digits: DataSplits):
    # With align_corners=False the pixel centres of a square image are symmetric
    # about the centre, so a quarter turn maps them onto each other exactly.
    images = digits.test.tensors[0].double()
    expected = torch.rot90(images, 1, dims=(-2, -1))
    torch.testing.assert_close(rotate_images(images, 90.0), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        rotate_images(images, -90.0), torch.rot90(images, -1, dims=(-2, -1))
    )


def test_rotation_by_180_flips_non_square_images():
    images = torch.rand(3, 2, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(
        rotate_images(images, 180.0), images.flip(-1, -2), atol=1e-6, rtol=0
    )


def test_rotation_keeps_a_centred_blob():
    coordinates = torch.arange(16, dtype=torch.float64) - 7.5
    radius2 = coordinates[:, None] ** 2 + coordinates[None, :] ** 2
    blob = torch.exp(-radius2 / 8.0)[None, None]
    for degrees in SHIFTS["rotation"]:
        rotated = rotate_images(blob, degrees)
        assert rotated.sum() == pytest.approx(blob.sum().item(), rel=0.05)
        assert (rotated - blob).abs().max() < 0.1


def test_rotation_changes_digits_but_keeps_their_mass(digits: DataSplits):
    images = digits.test.tensors[0]
    rotated = rotate_images(images, 45.0)
    assert rotated.shape == images.shape and rotated.dtype == images.dtype
    assert (rotated - images).abs().mean() > 0.05
    mass, rotated_mass = images.sum((1, 2, 3)), rotated.sum((1, 2, 3))
    assert (rotated_mass / mass).mean() == pytest.approx(1.0, abs=0.15)


def test_noise_is_clipped_and_reproducible(digits: DataSplits):
    images = digits.test.tensors[0]
    noisy = add_pixel_noise(images, 0.4, seed=3)
    assert noisy.shape == images.shape and noisy.dtype == images.dtype
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert (noisy == 0).any() and (noisy == 1).any()
    assert torch.equal(noisy, add_pixel_noise(images, 0.4, seed=3))
    assert not torch.equal(noisy, add_pixel_noise(images, 0.4, seed=4))
    assert torch.equal(add_pixel_noise(images, 0.0), images)
    # Stronger noise moves the pixels further.
    weak = (add_pixel_noise(images, 0.1) - images).abs().mean()
    strong = (add_pixel_noise(images, 0.8) - images).abs().mean()
    assert 0 < weak < strong


@pytest.mark.parametrize("kind", sorted(SHIFTS))
def test_shifted_keeps_targets(digits: DataSplits, kind: str):
    images, targets = digits.test.tensors
    for strength in SHIFTS[kind]:
        moved = shifted(digits.test, kind, strength, seed=1)
        assert isinstance(moved, TensorDataset)
        assert torch.equal(moved.tensors[1], targets)
        assert moved.tensors[0].shape == images.shape
        assert not torch.equal(moved.tensors[0], images)
    assert torch.equal(shifted(digits.test, kind, 0.0).tensors[0], images)


def test_shifted_matches_the_functions(digits: DataSplits):
    images = digits.test.tensors[0]
    torch.testing.assert_close(
        shifted(digits.test, "rotation", 30.0).tensors[0], rotate_images(images, 30.0)
    )
    assert torch.equal(
        shifted(digits.test, "noise", 0.2, seed=5).tensors[0],
        add_pixel_noise(images, 0.2, seed=5),
    )


# ---------------------------------------------------------------------------- OOD


def test_ood_patches(digits: DataSplits):
    patches, targets = load_ood_patches(200, seed=0).tensors
    assert patches.shape == (200, 1, 8, 8) and patches.dtype == torch.float32
    assert targets.shape == (200,) and targets.dtype == torch.long
    assert (targets == -1).all()
    assert patches.min() >= 0 and patches.max() <= 1
    flat = patches.reshape(200, -1)
    # Rescaled per patch: each spans [0, 1], none is constant.
    torch.testing.assert_close(flat.min(1).values, torch.zeros(200))
    torch.testing.assert_close(flat.max(1).values, torch.ones(200))
    assert (flat.std(1) > 0.05).all()
    # Unlike digits: no blank background, and no patch equals a digit.
    digit_images = digits.train.tensors[0].reshape(len(digits.train), -1)
    assert (digit_images == 0).float().mean() > 0.3
    assert (flat == 0).float().mean() < 0.1
    assert torch.cdist(flat, digit_images).min() > 0.1


def test_ood_patches_determinism_and_options():
    first = load_ood_patches(50, seed=0).tensors[0]
    assert torch.equal(first, load_ood_patches(50, seed=0).tensors[0])
    assert not torch.equal(first, load_ood_patches(50, seed=1).tensors[0])
    big = load_ood_patches(4, size=16, dtype=torch.float64).tensors[0]
    assert big.shape == (4, 1, 16, 16) and big.dtype == torch.float64


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


def test_shift_errors(digits: DataSplits):
    images = digits.test.tensors[0]
    with pytest.raises(ValueError, match=r"Unknown shift kind 'blur'.*noise.*rotation"):
        shifted(digits.test, "blur", 1.0)
    with pytest.raises(ValueError, match="strength must be a finite non-negative"):
        shifted(digits.test, "rotation", -15.0)
    with pytest.raises(ValueError, match="std must be a finite non-negative"):
        add_pixel_noise(images, -0.1)
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\), got \(10, 64\)"):
        rotate_images(images[:10].reshape(10, 64), 15.0)
    with pytest.raises(ValueError, match="images must be floating point"):
        rotate_images(torch.zeros(1, 1, 8, 8, dtype=torch.long), 15.0)
    with pytest.raises(ValueError, match="degrees must be finite"):
        rotate_images(images, float("nan"))
    with pytest.raises(ValueError, match="images must be a floating-point tensor"):
        add_pixel_noise(torch.zeros(2, 3, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        shifted(two_moons(10).train, "noise", 0.1)
    with pytest.raises(ValueError, match="non-empty TensorDataset"):
        shifted([images], "noise", 0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be at least 1, got 0"),
        ({"size": 0}, "size must be at least 1, got 0"),
        ({"size": 200}, "size must be at most 96, got 200"),
        ({"seed": -3}, "seed must lie in"),
        ({"dtype": torch.int32}, "dtype must be a floating torch dtype"),
    ],
)
def test_ood_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_ood_patches(**kwargs)


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

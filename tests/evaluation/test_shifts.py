"""Distribution shifts and OOD patches: geometry, seeds, validation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from ekfac_laplace.evaluation.data import DataSplits, load_digits_splits, two_moons
from ekfac_laplace.evaluation.shifts import (
    SHIFTS,
    add_pixel_noise,
    load_ood_patches,
    rotate_images,
    shifted,
)


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_digits_splits(seed=0)


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

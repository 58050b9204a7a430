"""Distribution shifts and out-of-distribution inputs for the digits images.

| Function           | What                                      | For            |
| ------------------ | ----------------------------------------- | -------------- |
| `rotate_images`    | rotation about the centre, bilinear       | shift calib.   |
| `add_pixel_noise`  | seeded Gaussian pixel noise, clipped      | shift calib.   |
| `shifted`          | a shifted copy of a data set              | shift calib.   |
| `load_ood_patches` | sklearn sample photos, 500 × (1, 8, 8)    | OOD detection  |

OOD patches are grayscale crops of ``china.jpg`` and ``flower.jpg``
(``load_sample_images``, offline) pooled to 8×8 and rescaled to ``[0, 1]``, with
targets -1 (no class).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images
from torch import Tensor
from torch.utils.data import TensorDataset

from ekfac_laplace.evaluation.checks import (
    check_dtype,
    check_non_negative,
    check_positive_int,
    check_seed,
)

__all__ = ["SHIFTS", "add_pixel_noise", "load_ood_patches", "rotate_images", "shifted"]

SHIFTS: dict[str, tuple[float, ...]] = {
    "rotation": (15.0, 30.0, 45.0, 60.0),
    "noise": (0.1, 0.2, 0.4, 0.8),
}
"""Distribution shifts and their standard strengths, mildest first.

``"rotation"``: degrees, counter-clockwise; ``"noise"``: standard deviation of
additive Gaussian pixel noise (pixels then clipped to ``[0, 1]``).
"""

_OOD_CROP_SIDES = (32, 96)
"""Range (inclusive) of the side in pixels of the photo crops behind OOD patches."""


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images)
        raise ValueError(
            f"images must be a tensor of shape (N, C, H, W), got {shape}; add the "
            "missing batch or channel dimension (e.g. images.unsqueeze(1))."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be floating point, got {images.dtype}; convert with "
            "images.float()."
        )


def rotate_images(images: Tensor, degrees: float) -> Tensor:
    """Rotate images about their centre, counter-clockwise as displayed.

    Bilinear interpolation (``affine_grid`` / ``grid_sample`` with
    ``align_corners=False``), zeros outside the image. The rotation acts in pixel
    units, so non-square images are not sheared. Multiples of 90 degrees on square
    images map pixel centres onto pixel centres: 90 degrees equals
    ``torch.rot90(images, 1, dims=(-2, -1))`` and 0 degrees returns the input, up to
    rounding.

    Args:
        images: Images of shape ``(N, C, H, W)``, floating point.
        degrees: Angle in degrees; negative angles rotate clockwise.

    Returns:
        The rotated images, of shape ``(N, C, H, W)``, same dtype and device.

    Raises:
        ValueError: If ``images`` is not a floating 4-D tensor or ``degrees`` is
            not finite.
    """
    _check_images(images)
    if not math.isfinite(degrees):
        raise ValueError(f"degrees must be finite, got {degrees}.")
    height, width = images.shape[-2:]
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # theta maps output to input coordinates, normalised to [-1, 1] per axis; the
    # aspect factors keep the rotation rigid in pixel units.
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
        dtype=images.dtype,
        device=images.device,
    ).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def add_pixel_noise(images: Tensor, std: float, *, seed: int = 0) -> Tensor:
    """Add seeded Gaussian pixel noise, then clip to ``[0, 1]``.

    Args:
        images: Images with pixels in ``[0, 1]``, any shape (e.g. ``(N, C, H, W)``),
            floating point.
        std: Standard deviation of the noise, ``>= 0``.
        seed: Seed of the noise; the same seed gives the same noise.

    Returns:
        ``clip(images + std · ε, 0, 1)`` with ``ε ~ N(0, I)``, same shape, dtype and
        device as ``images``.

    Raises:
        ValueError: If ``std`` is negative or not finite, ``images`` is not floating,
            or the seed is not a non-negative int.
    """
    check_non_negative("std", std)
    check_seed(seed)
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise ValueError(
            "images must be a floating-point tensor, got "
            f"{getattr(images, 'dtype', type(images))}; convert with images.float()."
        )
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    noisy = images + (std * noise).to(dtype=images.dtype, device=images.device)
    return noisy.clamp(0.0, 1.0)


def shifted(
    dataset: TensorDataset, kind: str, strength: float, *, seed: int = 0
) -> TensorDataset:
    """A copy of an image data set under a distribution shift.

    Args:
        dataset: ``TensorDataset`` whose first tensor holds images of shape
            ``(N, C, H, W)`` (pixels in ``[0, 1]`` for ``"noise"``); the other tensors
            (targets) are passed through unchanged.
        kind: One of ``SHIFTS``: ``"rotation"`` or ``"noise"``.
        strength: Degrees (counter-clockwise) for ``"rotation"``, noise standard
            deviation for ``"noise"``; ``>= 0``, 0 leaves the inputs unchanged. The
            standard strengths are ``SHIFTS[kind]``.
        seed: Seed of the noise (unused by ``"rotation"``).

    Returns:
        A ``TensorDataset`` with the shifted inputs and the original targets.

    Raises:
        ValueError: If ``kind`` is not in ``SHIFTS``, ``strength`` is negative, or the
            inputs are not floating images of shape ``(N, C, H, W)``.
    """
    if kind not in SHIFTS:
        raise ValueError(
            f"Unknown shift kind {kind!r}; choose one of {sorted(SHIFTS)}."
        )
    check_non_negative("strength", strength)
    if not isinstance(dataset, TensorDataset) or not dataset.tensors:
        raise ValueError(
            f"dataset must be a non-empty TensorDataset, got {type(dataset).__name__}."
        )
    inputs, *others = dataset.tensors
    if kind == "rotation":
        moved = rotate_images(inputs, strength)
    else:
        _check_images(inputs)
        moved = add_pixel_noise(inputs, strength, seed=seed)
    return TensorDataset(moved, *others)


# ---------------------------------------------------------------------------- OOD


@lru_cache(maxsize=1)
def _grayscale_photos() -> tuple[np.ndarray, ...]:
    """Scikit-learn's sample photographs as read-only grayscale arrays in [0, 1]."""
    luminance = np.array([0.299, 0.587, 0.114])
    photos = []
    for image in load_sample_images().images:
        gray = (image.astype(np.float64) @ luminance) / 255.0
        gray.setflags(write=False)
        photos.append(gray)
    return tuple(photos)


def load_ood_patches(
    n: int = 500,
    *,
    seed: int = 0,
    size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> TensorDataset:
    """Out-of-distribution images for a digits model: pooled photo patches.

    The set: ``n`` grayscale patches cut from the two photographs bundled with
    scikit-learn (``load_sample_images``: ``china.jpg``, a temple, and
    ``flower.jpg``, each 427×640 RGB). For each patch a photo is picked at random,
    a random square crop with a side drawn uniformly from 32..96 pixels (at least
    ``size``) is converted to grayscale (ITU-R 601 luma), downsampled to
    ``size × size`` by adaptive average pooling, so the patch keeps natural-image
    structure (edges, texture, gradients), and rescaled per patch to ``[0, 1]``
    (minimum 0, maximum 1; the digits' pixel range). Nearly constant crops (range
    below 0.05) are redrawn. The patches are not digits and belong to no class:
    every target is ``-1``, a placeholder that must not be fed to a loss; use the
    set only for predictive uncertainty (e.g. OOD AUROC against the digits test
    set).

    Args:
        n: Number of patches, ``>= 1``.
        seed: Seed of the patch positions and sizes; the same seed gives the same set.
        size: Side of the patches in pixels, 1..96 (8 matches the digits).
        dtype: Floating dtype of the patches.

    Returns:
        A ``TensorDataset`` of patches of shape ``(n, 1, size, size)`` in ``[0, 1]``
        and long targets of shape ``(n,)``, all ``-1``.

    Raises:
        ValueError: If ``n`` or ``size`` is out of range, the seed is not a
            non-negative int, or ``dtype`` is not floating.
    """
    check_positive_int("n", n)
    check_positive_int("size", size)
    if size > _OOD_CROP_SIDES[1]:
        raise ValueError(
            f"size must be at most {_OOD_CROP_SIDES[1]}, got {size}; pass a smaller "
            "size."
        )
    check_seed(seed)
    check_dtype(dtype)
    photos = _grayscale_photos()
    rng = np.random.default_rng(seed)
    low_side = max(_OOD_CROP_SIDES[0], size)
    patches = torch.empty(n, 1, size, size, dtype=torch.float64)
    filled = 0
    while filled < n:
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(low_side, _OOD_CROP_SIDES[1] + 1))
        top = int(rng.integers(photo.shape[0] - side + 1))
        left = int(rng.integers(photo.shape[1] - side + 1))
        crop = torch.from_numpy(photo[top : top + side, left : left + side].copy())
        patch = F.adaptive_avg_pool2d(crop[None, None], size)[0]
        low, high = patch.min(), patch.max()
        if high - low < 0.05:
            continue
        patches[filled] = (patch - low) / (high - low)
        filled += 1
    targets = torch.full((n,), -1, dtype=torch.long)
    return TensorDataset(patches.to(dtype), targets)

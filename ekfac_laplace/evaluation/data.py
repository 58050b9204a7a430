"""Bundled real data (scikit-learn, offline), distribution shifts and OOD sets.

Every loader works without network access: the real data sets ship inside
scikit-learn, the others are generated. The same ``seed`` always gives the same
tensors.

| Loader                 | Source (offline)       | Size              | For            |
| ---------------------- | ---------------------- | ----------------- | -------------- |
| `load_digits_splits`   | sklearn digits, ÷ 16   | 1,797 × (1, 8, 8) | classification |
| `shifted`              | rotation / pixel noise | as its input      | shift calib.   |
| `load_ood_patches`     | sklearn sample photos  | 500 × (1, 8, 8)   | OOD detection  |
| `toy_regression_1d`    | sin(2x) + 0.2x + noise | 150 / 50 / 300    | gap variance   |
| `regression_grid`      | linspace ± margin      | 400 × 1           | band plots     |
| `load_diabetes_splits` | sklearn diabetes       | 442 × 10          | regression     |
| `two_moons`            | sklearn make_moons     | 200 / 100 / 500   | 2-D boundaries |

Details: digits are scikit-learn's 8×8 UCI optdigits images (10 classes), split
stratified; OOD patches are grayscale crops of ``china.jpg`` and ``flower.jpg``
(``load_sample_images``) pooled to 8×8 and rescaled to ``[0, 1]``, with targets -1
(no class); the 1-D regression has no training inputs in a gap, where uncertainty
should grow; diabetes (442 patients, 10 features) is standardised with training
statistics only; the moons are generated with three seeds spawned from ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits, load_sample_images, make_moons
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = [
    "SHIFTS",
    "DataSplits",
    "add_pixel_noise",
    "load_diabetes_splits",
    "load_digits_splits",
    "load_ood_patches",
    "regression_grid",
    "rotate_images",
    "shifted",
    "toy_function",
    "toy_regression_1d",
    "two_moons",
]

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


@dataclass(frozen=True)
class DataSplits:
    """A data set split into train, validation and test sets.

    Attributes:
        train: Training set ``(inputs, targets)``.
        val: Validation set ``(inputs, targets)`` (for tuning, e.g. prior precision).
        test: Test set ``(inputs, targets)``.
        likelihood: ``"classification"`` (long class targets of shape ``(N,)``) or
            ``"regression"`` (float targets of shape ``(N, n_outputs)``).
        n_outputs: Number of classes, or of regression outputs.
        input_shape: Shape of one input, e.g. ``(1, 8, 8)``.
        description: One line: where the data come from and the split sizes.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    likelihood: str
    n_outputs: int
    input_shape: tuple[int, ...]
    description: str


# --------------------------------------------------------------------------- checks


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int, got {seed!r}; pass e.g. seed=0.")
    if not 0 <= seed < 2**32:
        raise ValueError(
            f"seed must lie in [0, 2**32), got {seed}; pass a non-negative seed."
        )


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype, got {dtype!r}; pass e.g. "
            "torch.float32 or torch.float64."
        )


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (
        ("val_fraction", val_fraction),
        ("test_fraction", test_fraction),
    ):
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"{name} must lie strictly between 0 and 1, got {value}; pass e.g. "
                f"{name}=0.2."
            )
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1 to leave training data, got "
            f"{val_fraction} + {test_fraction} = {val_fraction + test_fraction}; "
            "lower one of them."
        )


def _check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(
            f"{name} must be at least {minimum}, got {value}; pass a larger {name}."
        )


def _check_non_negative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite non-negative number, got {value}; pass "
            f"{name} >= 0."
        )


def _check_interval(name: str, interval: tuple[float, float]) -> tuple[float, float]:
    if len(interval) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {interval!r}.")
    low, high = float(interval[0]), float(interval[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"{name} must be a finite interval (low, high) with low < high, got "
            f"{interval!r}; swap or widen the bounds."
        )
    return low, high


# ---------------------------------------------------------------------- splitting


def _split_indices(
    n: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    stratify: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/val/test indices; fractions are of all ``n`` examples."""
    indices = np.arange(n)
    rest, test = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    val_share = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(
        rest,
        test_size=val_share,
        random_state=seed,
        stratify=None if stratify is None else stratify[rest],
    )
    return train, val, test


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """Read-only digits images of shape ``(1797, 8, 8)`` in [0, 1] and targets."""
    digits = load_digits()
    images = digits.images / 16.0
    images.setflags(write=False)
    digits.target.setflags(write=False)
    return images, digits.target


def _digits_split_indices(
    seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices into ``load_digits()`` of the train, val and test sets."""
    _check_seed(seed)
    _check_fractions(val_fraction, test_fraction)
    targets = _digits()[1]
    return _split_indices(len(targets), seed, val_fraction, test_fraction, targets)


def load_digits_splits(
    seed: int = 0,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    dtype: torch.dtype = torch.float32,
) -> DataSplits:
    """Scikit-learn's 8×8 handwritten digits, split with stratification.

    The 1,797 grayscale images (10 classes, UCI optdigits) ship with scikit-learn.
    Pixels (integers 0..16) are divided by 16 into ``[0, 1]``. The split is
    stratified by class and fixed by ``seed`` (``sklearn``'s ``train_test_split``):
    the same seed gives the same split. The three sets are disjoint and together hold
    all 1,797 images.

    Args:
        seed: Seed of the split, in ``[0, 2**32)``.
        val_fraction: Fraction of all images in the validation set, in ``(0, 1)``.
        test_fraction: Fraction of all images in the test set, in ``(0, 1)``, with
            ``val_fraction + test_fraction < 1``.
        dtype: Floating dtype of the inputs.

    Returns:
        Splits with inputs of shape ``(N, 1, 8, 8)`` in ``[0, 1]`` and long targets of
        shape ``(N,)`` in ``0..9``; ``likelihood="classification"``, ``n_outputs=10``.

    Raises:
        ValueError: If a fraction is outside ``(0, 1)``, they sum to 1 or more, the
            seed is not a non-negative int, or ``dtype`` is not floating.
    """
    _check_dtype(dtype)
    train, val, test = _digits_split_indices(seed, val_fraction, test_fraction)
    pixels, labels = _digits()
    images = torch.tensor(pixels, dtype=dtype).unsqueeze(1)
    targets = torch.tensor(labels, dtype=torch.long)

    def subset(index: np.ndarray) -> TensorDataset:
        index_tensor = torch.as_tensor(index)
        return TensorDataset(images[index_tensor], targets[index_tensor])

    return DataSplits(
        train=subset(train),
        val=subset(val),
        test=subset(test),
        likelihood="classification",
        n_outputs=10,
        input_shape=(1, 8, 8),
        description=(
            "scikit-learn 8x8 digits (UCI optdigits), 10 classes, pixels in [0, 1]; "
            f"stratified split (seed {seed}): train {len(train)} / val {len(val)} / "
            f"test {len(test)}"
        ),
    )


# ------------------------------------------------------------------------- shifts


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
    _check_non_negative("std", std)
    _check_seed(seed)
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
    _check_non_negative("strength", strength)
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
    _check_positive_int("n", n)
    _check_positive_int("size", size)
    if size > _OOD_CROP_SIDES[1]:
        raise ValueError(
            f"size must be at most {_OOD_CROP_SIDES[1]}, got {size}; pass a smaller "
            "size."
        )
    _check_seed(seed)
    _check_dtype(dtype)
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


# --------------------------------------------------------------------- regression


def toy_function(x: Tensor) -> Tensor:
    """The noise-free target of ``toy_regression_1d``: ``f(x) = sin(2x) + 0.2 x``.

    Args:
        x: Inputs of any shape, e.g. ``(N, 1)``.

    Returns:
        ``f(x)``, same shape as ``x``.
    """
    return torch.sin(2.0 * x) + 0.2 * x


def _uniform_outside_gap(
    generator: torch.Generator,
    n: int,
    domain: tuple[float, float],
    gap: tuple[float, float],
) -> Tensor:
    """``n`` draws, uniform on ``domain`` without the open interval ``gap``."""
    left = gap[0] - domain[0]
    right = domain[1] - gap[1]
    position = torch.rand(n, generator=generator, dtype=torch.float64) * (left + right)
    return torch.where(
        position < left, domain[0] + position, gap[1] + (position - left)
    )


def toy_regression_1d(
    n_train: int = 150,
    *,
    seed: int = 0,
    noise_std: float = 0.1,
    gap: tuple[float, float] = (-1.0, 1.0),
    domain: tuple[float, float] = (-4.0, 4.0),
    dtype: torch.dtype = torch.float32,
) -> DataSplits:
    """1-D regression with a gap in the training data.

    Targets are ``y = sin(2x) + 0.2 x + ε`` (``toy_function``), ``ε ~ N(0,
    noise_std²)``. Train and validation inputs are uniform on ``domain`` without
    ``gap``, so a good posterior's predictive uncertainty should grow inside the gap
    (and outside the domain); test inputs are uniform on the whole ``domain``,
    gap included. Sizes: ``n_train`` train, ``max(2, n_train // 3)`` validation and
    ``max(300, 2 · n_train)`` test points, all from one generator seeded by
    ``seed``.

    Args:
        n_train: Number of training points, ``>= 1``.
        seed: Seed of inputs and noise.
        noise_std: Standard deviation of the target noise, ``>= 0``.
        gap: Interval ``(low, high)`` inside ``domain`` without train/val inputs;
            ``low == high`` means no gap.
        domain: Interval ``(low, high)`` of the inputs.
        dtype: Floating dtype of inputs and targets.

    Returns:
        Splits with inputs and targets of shape ``(N, 1)``;
        ``likelihood="regression"``, ``n_outputs=1``, ``input_shape=(1,)``.

    Raises:
        ValueError: If ``n_train < 1``, ``noise_std < 0``, ``domain`` is not an
            interval, ``gap`` does not lie inside ``domain`` or covers all of it, the
            seed is not a non-negative int, or ``dtype`` is not floating.
    """
    _check_positive_int("n_train", n_train)
    _check_non_negative("noise_std", noise_std)
    _check_seed(seed)
    _check_dtype(dtype)
    domain = _check_interval("domain", domain)
    if len(gap) != 2 or not gap[0] <= gap[1]:
        raise ValueError(
            f"gap must be a pair (low, high) with low <= high, got {gap}; swap the "
            "bounds, or pass low == high for no gap."
        )
    gap = (float(gap[0]), float(gap[1]))
    if not domain[0] <= gap[0] <= gap[1] <= domain[1]:
        raise ValueError(
            f"gap {gap} must lie inside domain {domain}; shrink the gap or widen the "
            "domain."
        )
    if gap[1] - gap[0] >= domain[1] - domain[0]:
        raise ValueError(
            f"gap {gap} covers the whole domain {domain}, leaving no training inputs; "
            "shrink the gap."
        )
    generator = torch.Generator().manual_seed(int(seed))
    n_val = max(2, n_train // 3)
    n_test = max(300, 2 * n_train)

    def sample(x: Tensor) -> TensorDataset:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        y = toy_function(x) + noise_std * noise
        return TensorDataset(x.unsqueeze(-1).to(dtype), y.unsqueeze(-1).to(dtype))

    train = sample(_uniform_outside_gap(generator, n_train, domain, gap))
    val = sample(_uniform_outside_gap(generator, n_val, domain, gap))
    whole = torch.rand(n_test, generator=generator, dtype=torch.float64)
    test = sample(domain[0] + (domain[1] - domain[0]) * whole)
    return DataSplits(
        train=train,
        val=val,
        test=test,
        likelihood="regression",
        n_outputs=1,
        input_shape=(1,),
        description=(
            f"generated 1-D regression y = sin(2x) + 0.2x + N(0, {noise_std}^2) on "
            f"{domain} without training data in the gap {gap} (seed {seed}): train "
            f"{n_train} / val {n_val} / test {n_test} (test covers the gap)"
        ),
    )


def regression_grid(
    domain: tuple[float, float] = (-4.0, 4.0),
    n: int = 400,
    *,
    margin: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Evenly spaced 1-D inputs for plotting predictive bands.

    Args:
        domain: Interval ``(low, high)`` of the data.
        n: Number of grid points, ``>= 1``.
        margin: How far the grid extends beyond each end of ``domain``, ``>= 0``.
        dtype: Floating dtype of the grid.

    Returns:
        Inputs of shape ``(n, 1)`` from ``low - margin`` to ``high + margin``.

    Raises:
        ValueError: If ``domain`` is not an interval, ``n < 1``, ``margin < 0``, or
            ``dtype`` is not floating.
    """
    low, high = _check_interval("domain", domain)
    _check_positive_int("n", n)
    _check_non_negative("margin", margin)
    _check_dtype(dtype)
    return torch.linspace(low - margin, high + margin, n, dtype=dtype).unsqueeze(-1)


def load_diabetes_splits(
    seed: int = 0,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    dtype: torch.dtype = torch.float32,
) -> DataSplits:
    """Scikit-learn's diabetes regression data, standardised on the training set.

    442 patients, 10 baseline features (age, sex, BMI, blood pressure, six serum
    measurements), target a measure of disease progression one year later. The raw
    features and the target are standardised with the mean and standard deviation
    of the training split only (no leakage into val/test); the description gives the
    target's training mean and standard deviation to undo it.

    Args:
        seed: Seed of the split, in ``[0, 2**32)``.
        val_fraction: Fraction of all patients in the validation set, in ``(0, 1)``.
        test_fraction: Fraction of all patients in the test set, in ``(0, 1)``, with
            ``val_fraction + test_fraction < 1``.
        dtype: Floating dtype of inputs and targets.

    Returns:
        Splits with inputs of shape ``(N, 10)`` and targets of shape ``(N, 1)``;
        ``likelihood="regression"``, ``n_outputs=1``, ``input_shape=(10,)``.

    Raises:
        ValueError: If a fraction is outside ``(0, 1)``, they sum to 1 or more, the
            seed is not a non-negative int, or ``dtype`` is not floating.
    """
    _check_seed(seed)
    _check_fractions(val_fraction, test_fraction)
    _check_dtype(dtype)
    features, target = load_diabetes(return_X_y=True, scaled=False)
    target = target[:, None]
    train, val, test = _split_indices(len(target), seed, val_fraction, test_fraction)
    x_mean, x_std = features[train].mean(0), features[train].std(0)
    y_mean, y_std = target[train].mean(0), target[train].std(0)

    def subset(index: np.ndarray) -> TensorDataset:
        inputs = (features[index] - x_mean) / x_std
        targets = (target[index] - y_mean) / y_std
        return TensorDataset(
            torch.as_tensor(inputs, dtype=dtype), torch.as_tensor(targets, dtype=dtype)
        )

    return DataSplits(
        train=subset(train),
        val=subset(val),
        test=subset(test),
        likelihood="regression",
        n_outputs=1,
        input_shape=(10,),
        description=(
            "scikit-learn diabetes (442 x 10), inputs and target standardised on "
            f"train (target mean {y_mean[0]:.1f}, std {y_std[0]:.1f}); split "
            f"(seed {seed}): train {len(train)} / val {len(val)} / test {len(test)}"
        ),
    )


def two_moons(
    n_train: int = 200,
    *,
    seed: int = 0,
    noise: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> DataSplits:
    """Scikit-learn's generated two-moons classification data.

    Train, validation and test sets are drawn independently by ``make_moons`` with
    three seeds spawned from ``seed`` (``numpy.random.SeedSequence``); sizes are
    ``n_train``, ``max(2, n_train // 2)`` and ``max(500, n_train)``.

    Args:
        n_train: Number of training points, ``>= 2`` (one per moon at least).
        seed: Seed of the three sets.
        noise: Standard deviation of the Gaussian noise on the points, ``>= 0``.
        dtype: Floating dtype of the inputs.

    Returns:
        Splits with inputs of shape ``(N, 2)`` and long targets of shape ``(N,)`` in
        ``{0, 1}``; ``likelihood="classification"``, ``n_outputs=2``.

    Raises:
        ValueError: If ``n_train < 2``, ``noise < 0``, the seed is not a non-negative
            int, or ``dtype`` is not floating.
    """
    _check_positive_int("n_train", n_train, minimum=2)
    _check_non_negative("noise", noise)
    _check_seed(seed)
    _check_dtype(dtype)
    seeds = [
        int(child.generate_state(1)[0])
        for child in np.random.SeedSequence(int(seed)).spawn(3)
    ]
    sizes = (n_train, max(2, n_train // 2), max(500, n_train))

    def sample(n: int, moon_seed: int) -> TensorDataset:
        inputs, targets = make_moons(n_samples=n, noise=noise, random_state=moon_seed)
        return TensorDataset(
            torch.as_tensor(inputs, dtype=dtype),
            torch.as_tensor(targets, dtype=torch.long),
        )

    train, val, test = (sample(n, s) for n, s in zip(sizes, seeds))
    return DataSplits(
        train=train,
        val=val,
        test=test,
        likelihood="classification",
        n_outputs=2,
        input_shape=(2,),
        description=(
            f"scikit-learn make_moons (generated, noise {noise}, seed {seed}), "
            f"2 classes: train {sizes[0]} / val {sizes[1]} / test {sizes[2]}"
        ),
    )

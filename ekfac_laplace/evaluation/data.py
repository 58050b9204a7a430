"""Bundled data sets (scikit-learn, offline), split into train / validation / test.

Every loader works without network access: the real data sets ship inside
scikit-learn, the others are generated. The same ``seed`` always gives the same
tensors.

| Loader                     | Source (offline)       | Size            | For          |
| -------------------------- | ---------------------- | --------------- | ------------ |
| `load_digits_splits`       | sklearn digits, ÷ 16   | 1,797 × 8 × 8   | classifying  |
| `load_noisy_digits_splits` | digits, noisy labels   | 300 / 270 / 450 | noisy MAP    |
| `toy_regression_1d`        | sin(2x) + 0.2x + noise | 150 / 50 / 300  | gap variance |
| `regression_grid`          | linspace ± margin      | 400 × 1         | band plots   |
| `load_diabetes_splits`     | sklearn diabetes       | 442 × 10        | regression   |
| `two_moons`                | sklearn make_moons     | 200 / 100 / 500 | 2-D maps     |

Details: digits are scikit-learn's 8×8 UCI optdigits images (10 classes), split
stratified; the 1-D regression has no training inputs in a gap, where uncertainty
should grow; diabetes (442 patients, 10 features) is standardised with training
statistics only; the moons are generated with three seeds spawned from ``seed``.
Shifted and out-of-distribution versions of digits are in
:mod:`~ekfac_laplace.evaluation.shifts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_diabetes, load_digits, make_moons
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import TensorDataset

from ekfac_laplace.evaluation.checks import (
    check_dtype,
    check_fractions,
    check_interval,
    check_non_negative,
    check_positive_int,
    check_seed,
)

__all__ = [
    "DataSplits",
    "load_diabetes_splits",
    "load_digits_splits",
    "load_noisy_digits_splits",
    "regression_grid",
    "toy_function",
    "toy_regression_1d",
    "two_moons",
]


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
    check_seed(seed)
    check_fractions(val_fraction, test_fraction)
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
    check_dtype(dtype)
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


def load_noisy_digits_splits(
    seed: int = 0,
    *,
    n_train: int = 300,
    label_noise: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> DataSplits:
    """Digits made hard: few training images and noisy labels in every split.

    The regime where a MAP network is over-confident and a posterior can help
    in distribution: :func:`load_digits_splits` (same seed, same validation and test
    images), its training set cut to a stratified ``n_train`` images, and in every
    split each label replaced with probability ``label_noise`` by one of the nine
    other classes, uniformly (the noise is part of the task, so the test labels
    carry it too; the Bayes accuracy is at most ``1 − label_noise``).

    Args:
        seed: Seed of the split, the subsample and the noise, in ``[0, 2**32)``.
        n_train: Training images, from 10 to 1,077 (at least one per class).
        label_noise: Probability that a label is replaced, in ``[0, 0.9)``.
        dtype: Floating dtype of the inputs.

    Returns:
        Splits like :func:`load_digits_splits`, with ``n_train`` training images.

    Raises:
        ValueError: For a bad size, noise rate, seed or dtype.
    """
    splits = load_digits_splits(seed, dtype=dtype)
    train_images, train_labels = splits.train.tensors
    if not 10 <= n_train <= len(train_labels):
        raise ValueError(
            f"n_train must be between 10 (one image per class) and "
            f"{len(train_labels)} (the digits training split), got {n_train}."
        )
    if not 0 <= label_noise < 0.9:
        raise ValueError(
            f"label_noise must be in [0, 0.9) (0.9 leaves no signal), got "
            f"{label_noise!r}."
        )
    index = np.arange(len(train_labels))
    if n_train < len(train_labels):
        index, _ = train_test_split(
            index,
            train_size=n_train,
            random_state=seed,
            stratify=train_labels.numpy(),
        )
    generators = [
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(3)
    ]

    def noisy(
        images: Tensor, labels: Tensor, rng: np.random.Generator
    ) -> TensorDataset:
        flipped = torch.as_tensor(rng.random(len(labels)) < label_noise)
        offset = torch.as_tensor(rng.integers(1, 10, len(labels)))
        labels = torch.where(flipped, (labels + offset) % 10, labels)
        return TensorDataset(images, labels)

    chosen = torch.as_tensor(np.sort(index))
    train = noisy(train_images[chosen], train_labels[chosen], generators[0])
    val = noisy(*splits.val.tensors, generators[1])
    test = noisy(*splits.test.tensors, generators[2])
    return DataSplits(
        train=train,
        val=val,
        test=test,
        likelihood="classification",
        n_outputs=10,
        input_shape=(1, 8, 8),
        description=(
            f"scikit-learn 8x8 digits with {label_noise:.0%} of the labels in every "
            f"split replaced by another class (seed {seed}), 10 classes: train "
            f"{n_train} (stratified subsample) / val {len(val)} / test {len(test)}"
        ),
    )


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
    check_positive_int("n_train", n_train)
    check_non_negative("noise_std", noise_std)
    check_seed(seed)
    check_dtype(dtype)
    domain = check_interval("domain", domain)
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
    low, high = check_interval("domain", domain)
    check_positive_int("n", n)
    check_non_negative("margin", margin)
    check_dtype(dtype)
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
    check_seed(seed)
    check_fractions(val_fraction, test_fraction)
    check_dtype(dtype)
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
    check_positive_int("n_train", n_train, minimum=2)
    check_non_negative("noise", noise)
    check_seed(seed)
    check_dtype(dtype)
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

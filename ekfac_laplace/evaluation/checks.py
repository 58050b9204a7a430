"""Validation of the evaluation side's inputs: one message per kind of mistake.

Every metric, figure, predictor and data generator checks its inputs here, so that
the same mistake (logits instead of probabilities, labels out of range, mismatched
shapes, a bad seed or fraction) gets the same message wherever it is made.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real

import numpy as np
import torch
from torch import Tensor

#: Tolerance on ``0 <= p <= 1`` and on ``Σ_k p_k = 1`` (the sum is 1, so absolute
#: and relative tolerance coincide).
PROB_TOLERANCE = 1e-4
#: Interval probabilities of the regression calibration error: 0.05, 0.10, ..., 0.95.
DEFAULT_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Refuse a value that is not one of ``choices``.

    Args:
        name: The option's name, for the message.
        value: The value.
        choices: The allowed values.

    Raises:
        ValueError: If ``value`` is not in ``choices``.
    """
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {choices}.")


def check_tensor(name: str, value: object) -> Tensor:
    """Refuse anything but a tensor.

    Args:
        name: The argument's name, for the message.
        value: The value.

    Returns:
        The tensor.

    Raises:
        TypeError: If ``value`` is not a tensor.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    return value


def check_probs(probs: object, name: str = "probs") -> Tensor:
    """Predictive probabilities ``(N, C)``: finite, in ``[0, 1]``, rows summing to 1.

    Args:
        probs: The probabilities.
        name: The argument's name, for the message.

    Returns:
        The tensor.

    Raises:
        TypeError: If ``probs`` is not a tensor.
        ValueError: For another shape, non-finite values, logits or unnormalised rows.
    """
    probs = check_tensor(name, probs)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(
            f"{name} must have shape (N, C) with N >= 1 examples and C >= 2 classes, "
            f"got shape {tuple(probs.shape)}."
        )
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {probs.dtype}.")
    if not torch.isfinite(probs).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    low, high = probs.min().item(), probs.max().item()
    if low < -PROB_TOLERANCE or high > 1 + PROB_TOLERANCE:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "pass probabilities (apply torch.softmax(logits, dim=-1)), not logits."
        )
    deviation = (probs.sum(dim=1) - 1).abs().max().item()
    if deviation > PROB_TOLERANCE:
        raise ValueError(
            f"The rows of {name} must sum to 1 (tolerance {PROB_TOLERANCE}), but one "
            f"is off by {deviation:.4g}; normalise them, e.g. with "
            "torch.softmax(logits, dim=-1)."
        )
    return probs


def check_targets(targets: object, probs: Tensor) -> Tensor:
    """Integer labels ``(N,)`` in ``[0, C)`` for probabilities ``(N, C)``.

    Args:
        targets: The labels.
        probs: The checked probabilities they belong to.

    Returns:
        The labels as ``long`` on the device of ``probs``.

    Raises:
        TypeError: If ``targets`` is not a tensor.
        ValueError: For another shape, non-integer labels or labels out of range.
    """
    targets = check_tensor("targets", targets)
    n_examples, n_classes = probs.shape
    if targets.shape != (n_examples,):
        raise ValueError(
            f"targets must have shape (N,) = ({n_examples},) to match probs of shape "
            f"{tuple(probs.shape)}, got shape {tuple(targets.shape)}."
        )
    if (
        targets.is_floating_point()
        or targets.is_complex()
        or targets.dtype == torch.bool
    ):
        raise ValueError(
            f"targets must be integer class labels, got dtype {targets.dtype}; "
            "convert them with targets.long()."
        )
    low, high = targets.min().item(), targets.max().item()
    if low < 0 or high >= n_classes:
        raise ValueError(
            f"targets must lie in [0, {n_classes - 1}] for {n_classes} classes, got "
            f"labels in [{low}, {high}]."
        )
    return targets.long().to(probs.device)


def check_classification(probs: object, targets: object) -> tuple[Tensor, Tensor]:
    """Probabilities and labels of a classifier (see the two checks above).

    Args:
        probs: Probabilities ``(N, C)``.
        targets: Labels ``(N,)``.

    Returns:
        Both, checked.
    """
    probs = check_probs(probs)
    return probs, check_targets(targets, probs)


def check_n_bins(n_bins: object) -> int:
    """A positive number of bins.

    Args:
        n_bins: The number.

    Returns:
        It, as an ``int``.

    Raises:
        ValueError: Unless it is an integer >= 1.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    return n_bins


def check_level(level: object, name: str = "level") -> float:
    """A probability level in ``(0, 1)``.

    Args:
        level: The level.
        name: The argument's name, for the message.

    Returns:
        It, as a ``float``.

    Raises:
        ValueError: Unless it is a number strictly between 0 and 1.
    """
    if isinstance(level, bool) or not isinstance(level, Real) or not 0 < level < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {level!r}.")
    return float(level)


def check_scores(name: str, scores: object) -> Tensor:
    """Finite detection scores of shape ``(N,)``, ``N >= 1``.

    Args:
        name: The argument's name, for the message.
        scores: The scores.

    Returns:
        The tensor.

    Raises:
        TypeError: If ``scores`` is not a tensor.
        ValueError: For another shape or non-finite values.
    """
    scores = check_tensor(name, scores)
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(
            f"{name} must have shape (N,) with N >= 1, got shape {tuple(scores.shape)}."
        )
    if not torch.isfinite(scores.double()).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return scores


def check_regression(**tensors: object) -> list[Tensor]:
    """Same-shape ``(N,)`` or ``(N, K)`` floating tensors, returned as ``(N, K)``."""
    checked = [check_tensor(name, value) for name, value in tensors.items()]
    shapes = {name: tuple(value.shape) for name, value in zip(tensors, checked)}
    if len(set(shapes.values())) != 1:
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"Shapes must match, got {described}.")
    shape = checked[0].shape
    if len(shape) not in (1, 2) or shape[0] == 0 or (len(shape) == 2 and not shape[1]):
        raise ValueError(
            f"Regression tensors must have shape (N, K) or (N,) with N, K >= 1, got "
            f"shape {tuple(shape)}."
        )
    for name, value in zip(tensors, checked):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}.")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or infinite values.")
    if "variance" in tensors:
        variance = checked[list(tensors).index("variance")]
        if (variance <= 0).any():
            raise ValueError(
                f"variance must be positive, got minimum {variance.min().item():.4g}; "
                "add the observation noise σ² to the functional variance."
            )
    return [value.reshape(shape[0], -1) for value in checked]


def check_levels(levels: Iterable[float] | None) -> tuple[float, ...]:
    """Interval probabilities, each in ``(0, 1)``; :data:`DEFAULT_LEVELS` if ``None``.

    Args:
        levels: The levels, or ``None``.

    Returns:
        The levels as a tuple of floats.

    Raises:
        ValueError: If there are none or one lies outside ``(0, 1)``.
    """
    levels = DEFAULT_LEVELS if levels is None else tuple(levels)
    if not levels:
        raise ValueError("levels must not be empty; pass e.g. (0.5, 0.9, 0.95).")
    return tuple(check_level(level, "every level") for level in levels)


# ------------------------------------------------------------ data generation
def check_seed(seed: int) -> None:
    """A seed for numpy and scikit-learn: an integer in ``[0, 2**32)``.

    Args:
        seed: The seed.

    Raises:
        ValueError: Otherwise.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int, got {seed!r}; pass e.g. seed=0.")
    if not 0 <= seed < 2**32:
        raise ValueError(
            f"seed must lie in [0, 2**32), got {seed}; pass a non-negative seed."
        )


def check_dtype(dtype: torch.dtype) -> None:
    """A floating-point torch dtype.

    Args:
        dtype: The dtype.

    Raises:
        ValueError: Otherwise.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype, got {dtype!r}; pass e.g. "
            "torch.float32 or torch.float64."
        )


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validation and test fractions in ``(0, 1)`` that leave training data.

    Args:
        val_fraction: Fraction of all examples for validation.
        test_fraction: Fraction of all examples for testing.

    Raises:
        ValueError: If either lies outside ``(0, 1)`` or they sum to 1 or more.
    """
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


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    """An integer of at least ``minimum``.

    Args:
        name: The argument's name, for the message.
        value: The value.
        minimum: The smallest allowed value.

    Raises:
        ValueError: Otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(
            f"{name} must be at least {minimum}, got {value}; pass a larger {name}."
        )


def check_non_negative(name: str, value: float) -> None:
    """A finite number ``>= 0``.

    Args:
        name: The argument's name, for the message.
        value: The value.

    Raises:
        ValueError: Otherwise.
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite non-negative number, got {value}; pass "
            f"{name} >= 0."
        )


def check_interval(name: str, interval: tuple[float, float]) -> tuple[float, float]:
    """A finite interval ``(low, high)`` with ``low < high``.

    Args:
        name: The argument's name, for the message.
        interval: The pair.

    Returns:
        ``(low, high)`` as floats.

    Raises:
        ValueError: Otherwise.
    """
    if len(interval) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {interval!r}.")
    low, high = float(interval[0]), float(interval[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"{name} must be a finite interval (low, high) with low < high, got "
            f"{interval!r}; swap or widen the bounds."
        )
    return low, high

"""Checks of the hyperparameters a user passes: prior, noise, temperature.

Each refuses what laplace-torch would mis-handle later (a string, a NaN, a negative
precision) with a ``ValueError`` that names the hyperparameter and the value.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def real_values(name: str, value: object) -> Tensor:
    """A hyperparameter as a detached tensor, refusing what is not a number.

    laplace-torch accepts real scalars (Python or NumPy) and tensors and refuses
    anything else with a ``ValueError``; so do we, before torch would raise a
    ``TypeError`` on a string or a ragged list.

    Args:
        name: The hyperparameter's name, for the message.
        value: Its value.

    Returns:
        The value as a tensor (detached).

    Raises:
        ValueError: Unless ``value`` is a real number or a tensor.
    """
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, numbers.Real):
        return torch.as_tensor(float(value))
    raise ValueError(
        f"{name} must be a real number or a torch.Tensor, got "
        f"{type(value).__name__} {value!r:.60}."
    )


def check_prior_precision(prior_precision: float | Tensor) -> None:
    """Refuse a prior precision that is not a finite, non-negative scalar / 1-D tensor.

    Args:
        prior_precision: A number or a tensor of them.

    Raises:
        ValueError: For any of these.
    """
    values = real_values("prior_precision", prior_precision)
    if values.ndim > 1:
        raise ValueError(
            f"prior_precision must be a scalar or a 1-D tensor, got shape "
            f"{tuple(values.shape)}."
        )
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(
            f"prior_precision must be finite and non-negative, got "
            f"{values.flatten()[:8].tolist()}; a zero prior is allowed only where "
            "the curvature is positive."
        )


def check_finite(name: str, value: float | Tensor) -> None:
    """Refuse a hyperparameter with a NaN or Inf (the prior mean).

    Args:
        name: The hyperparameter's name, for the message.
        value: Its value.

    Raises:
        ValueError: Unless every value is a finite real number.
    """
    values = real_values(name, value)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"{name} must be finite, got {values.flatten()[:8].tolist()}; the "
            "evidence would be NaN."
        )


def check_positive_scalar(name: str, value: float | Tensor) -> None:
    """Refuse a non-finite or non-positive ``sigma_noise`` / ``temperature``.

    Args:
        name: The hyperparameter's name, for the message.
        value: Its value.

    Raises:
        ValueError: Unless ``value`` is one finite number > 0.
    """
    values = real_values(name, value)
    if values.numel() != 1 or not bool(torch.isfinite(values).all()) or values <= 0:
        shown = values.flatten()[:8].tolist()
        raise ValueError(f"{name} must be one finite, positive number, got {shown}.")

"""Eigenvectors of a symmetric positive semi-definite matrix, robust to ``eigh``.

The Kronecker factors and the exact blocks of a fit are decomposed here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def robust_eigenvectors(factor: Tensor, description: str) -> Tensor:
    """Eigenvectors of a Kronecker factor, robust to ``eigh`` failing to converge.

    ``eigh`` can fail on ill-conditioned float32 factors; it is retried in float64,
    then in float64 with a shift ``c I`` (which leaves the eigenvectors unchanged).

    Args:
        factor: A symmetric positive semi-definite matrix.
        description: What it is, for messages.

    Returns:
        Orthonormal eigenvectors (columns) in the factor's dtype.

    Raises:
        ValueError: If the factor is not finite.
        RuntimeError: If ``eigh`` fails even in float64 with a shift.
    """
    if not torch.isfinite(factor).all():
        raise ValueError(
            f"The Kronecker {description} is not finite (NaN or Inf); check the "
            "model's outputs and the data for NaN/Inf."
        )
    try:
        return torch.linalg.eigh(factor).eigenvectors
    except torch.linalg.LinAlgError:
        pass
    double = factor.double()
    scale = double.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True)
    shift = scale.clamp_min(1.0).unsqueeze(-1) * 1e-8  # per matrix of a stack
    identity = torch.eye(double.shape[-1], dtype=double.dtype, device=double.device)
    for candidate in (double, double + shift * identity):
        try:
            return torch.linalg.eigh(candidate).eigenvectors.to(factor.dtype)
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError(
        f"eigh did not converge on the Kronecker {description}, even in float64 "
        "with a diagonal shift; the factor is numerically degenerate. Check the "
        "data scale, or freeze that layer with requires_grad_(False)."
    )

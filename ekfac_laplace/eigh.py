"""Eigendecompositions of symmetric positive semi-definite matrices, robust to ``eigh``.

The Kronecker factors and the exact blocks of a fit are decomposed here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def robust_eigh(matrix: Tensor, description: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors, robust to ``eigh`` failing to converge.

    ``eigh`` can fail on ill-conditioned float32 matrices; it is retried in
    float64, then in float64 with a shift ``c I`` (which leaves the eigenvectors
    unchanged and is taken off the eigenvalues again).

    Args:
        matrix: A symmetric positive semi-definite matrix (or a stack of them).
        description: What it is, for messages (e.g. "Kronecker input factor of
            layer '0'").

    Returns:
        ``(λ, Q)``: the eigenvalues (ascending) and orthonormal eigenvectors
        (columns), in the matrix's dtype.

    Raises:
        ValueError: If the matrix is not finite.
        RuntimeError: If ``eigh`` fails even in float64 with a shift.
    """
    if not torch.isfinite(matrix).all():
        raise ValueError(
            f"The {description} is not finite (NaN or Inf); check the model's "
            "outputs and the data for NaN/Inf."
        )
    try:
        values, vectors = torch.linalg.eigh(matrix)
        return values, vectors
    except torch.linalg.LinAlgError:
        pass
    double = matrix.double()
    scale = double.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True)
    shift = scale.clamp_min(1.0).unsqueeze(-1) * 1e-8  # per matrix of a stack
    identity = torch.eye(double.shape[-1], dtype=double.dtype, device=double.device)
    for added in (torch.zeros_like(shift), shift):
        try:
            values, vectors = torch.linalg.eigh(double + added * identity)
        except torch.linalg.LinAlgError:
            continue
        values = values - added.squeeze(-1)
        return values.to(matrix.dtype), vectors.to(matrix.dtype)
    raise RuntimeError(
        f"eigh did not converge on the {description}, even in float64 with a "
        "diagonal shift; it is numerically degenerate. Check the data scale, or "
        "freeze that layer with requires_grad_(False)."
    )


def robust_eigenvectors(factor: Tensor, description: str) -> Tensor:
    """The eigenvectors of :func:`robust_eigh` (a Kronecker factor's basis).

    Args:
        factor: A symmetric positive semi-definite matrix (or a stack of them).
        description: What it is, for messages.

    Returns:
        Orthonormal eigenvectors (columns) in the factor's dtype.
    """
    return robust_eigh(factor, description)[1]

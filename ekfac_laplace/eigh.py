r"""Eigendecompositions of symmetric positive semi-definite matrices, robust to eigh.

The Kronecker factors and the exact blocks of a fit are decomposed here.
``torch.linalg.eigh`` can fail in two ways on a finite symmetric matrix: it raises
(LAPACK did not converge), or, in float32 on some LAPACK builds, it returns NaN
without raising (MKL's ``ssyevd`` on a rank-deficient factor, such as the gradient
factor of a ResNet's last stage on one thread). :func:`robust_eigh` checks every
result and falls back, in order, to

1. ``eigh`` in the matrix's dtype;
2. ``eigh`` in float64;
3. ``eigh`` in float64 of ``M + c I`` with ``c = 10^{-8} \max(1, \overline{|M_{ii}|})``,
   which has the same eigenvectors, and the shift taken off the eigenvalues again,

and refuses only a matrix that is not finite, or one on which all three fail.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The relative diagonal shift of the last attempt.
RELATIVE_SHIFT = 1e-8


def robust_eigh(matrix: Tensor, description: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors, robust to ``eigh`` failing or returning NaN.

    Args:
        matrix: A symmetric positive semi-definite matrix (or a stack of them).
        description: What it is, for messages (e.g. "Kronecker input factor of
            layer '0'").

    Returns:
        ``(λ, Q)``: the eigenvalues (ascending) and orthonormal eigenvectors
        (columns), in the matrix's dtype, both finite.

    Raises:
        ValueError: If the matrix is not finite.
        RuntimeError: If ``eigh`` fails (raises, or returns NaN / Inf) in the
            matrix's dtype, in float64 and in float64 with a shift.
    """
    if not torch.isfinite(matrix).all():
        raise ValueError(
            f"The {description} is not finite (NaN or Inf); check the model's "
            "outputs and the data for NaN/Inf."
        )
    found = _finite_eigh(matrix)
    if found is not None:
        return found
    double = matrix.double()
    scale = double.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True)
    shift = scale.clamp_min(1.0).unsqueeze(-1) * RELATIVE_SHIFT  # per matrix
    identity = torch.eye(double.shape[-1], dtype=double.dtype, device=double.device)
    for added in (None, shift):
        shifted = double if added is None else double + added * identity
        found = _finite_eigh(shifted)
        if found is not None:
            values, vectors = found
            if added is not None:
                values = values - added.squeeze(-1)
            return values.to(matrix.dtype), vectors.to(matrix.dtype)
    raise RuntimeError(
        f"eigh failed on the {description} (it did not converge or returned "
        f"NaN) in {matrix.dtype}, in float64 and in float64 with a diagonal "
        "shift: the matrix is finite but numerically degenerate. Check the data "
        "scale, or freeze that layer with requires_grad_(False)."
    )


def _finite_eigh(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """``eigh`` of ``matrix``, or ``None`` where it raises or returns NaN / Inf."""
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        return None
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        return None
    return values, vectors


def robust_eigenvectors(factor: Tensor, description: str) -> Tensor:
    """The eigenvectors of :func:`robust_eigh` (a Kronecker factor's basis).

    Args:
        factor: A symmetric positive semi-definite matrix (or a stack of them).
        description: What it is, for messages.

    Returns:
        Orthonormal eigenvectors (columns) in the factor's dtype.
    """
    return robust_eigh(factor, description)[1]

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

A large factor of low rank (a convolution whose input has few positions, fitted on
few examples: ResNet-18's 4608 × 4608 input factors of its last stage have rank 4
on 4 images) is where ``eigh`` is slowest and most often fails (7 s in float32, then
13 s in float64). Before ``eigh``, a matrix of at least :data:`LOW_RANK_SIZE` rows
is tried as one of rank at most :data:`LOW_RANK` (Halko et al., 2011): an
orthonormal basis ``U`` of ``range(M Ω)`` for a Gaussian ``Ω``; where ``M`` equals
``U Uᵀ M`` up to rounding in its dtype (checked on random probes), its
eigenvectors are ``U W`` with ``W`` those of ``Uᵀ M U``, and any orthonormal basis
of the complement (from a complete QR of ``U``) has eigenvalue 0. In the null
directions any basis is an eigenbasis, and EKFAC's corrected eigenvalues there
are zero whichever is taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The relative diagonal shift of the last attempt.
RELATIVE_SHIFT = 1e-8
#: Matrices with at least this many rows are first tried as of low rank.
LOW_RANK_SIZE = 1024
#: The largest rank tried.
LOW_RANK = 64
#: Random probes of the low-rank residual, and its tolerance in units of the
#: dtype's machine epsilon, relative to ``‖M z‖``.
PROBES, RESIDUAL_EPSILONS = 8, 1e3


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
    found = _low_rank_eigh(matrix)
    if found is None:
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


def _low_rank_eigh(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """The eigenpairs of a large matrix of rank at most :data:`LOW_RANK`, or ``None``.

    Computed in float64 and returned in the matrix's dtype, eigenvalues ascending.
    """
    size = matrix.shape[-1]
    if matrix.ndim != 2 or size < LOW_RANK_SIZE:
        return None
    double = matrix.double()
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(
        size,
        LOW_RANK + PROBES,
        generator=generator,
        dtype=double.dtype,
        device=double.device,
    )
    image = double @ probe
    basis, _ = torch.linalg.qr(image[:, :LOW_RANK])
    tests = image[:, LOW_RANK:]  # M z for probes z that the basis did not see
    residual = tests - basis @ (basis.mT @ tests)
    epsilon = torch.finfo(matrix.dtype).eps
    if float(residual.norm()) > RESIDUAL_EPSILONS * epsilon * float(tests.norm()):
        return None
    projected = basis.mT @ double @ basis
    found = _finite_eigh((projected + projected.mT) / 2)
    if found is None:
        return None
    values, rotation = found
    # The complement in the matrix's own dtype (float32: half the time of float64).
    complete, _ = torch.linalg.qr(basis.to(matrix.dtype), mode="complete")
    vectors = torch.cat(
        [complete[:, LOW_RANK:], (basis @ rotation).to(matrix.dtype)], dim=1
    )
    values = torch.cat([values.new_zeros(size - LOW_RANK), values])
    order = torch.argsort(values)
    return values[order].to(matrix.dtype), vectors[:, order]


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

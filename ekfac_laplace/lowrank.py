r"""A diagonal plus a low-rank term, ``M = Λ + V Vᵀ``: its exact operations.

The low-rank correction of a Kronecker block (``correction_rank``) keeps, in the
block's eigenbasis ``Q``, the exact diagonal ``D`` of the rotated curvature
``R = Qᵀ B Q`` minus its top-``k`` part and that part itself, ``U S Uᵀ``. With the
scale ``c`` (the likelihood's) and the prior ``δ`` the block's precision is
``Q (Λ + V Vᵀ) Qᵀ`` with

$$
    Λ = c D + δ , \qquad V = U \, (c S)^{1/2} \quad (n × k),
$$

and every operation needs only ``Λ``, ``V`` and ``k × k`` matrices:

* the inverse by Woodbury, ``M⁻¹ = Λ⁻¹ − Λ⁻¹ V C⁻¹ Vᵀ Λ⁻¹`` with the capacitance
  ``C = I + Vᵀ Λ⁻¹ V`` (positive definite whatever ``S ≥ 0``);
* the log determinant by the matrix determinant lemma,
  ``log det M = Σ log Λ + log det C``, differentiable in ``c`` and ``δ``;
* a factor ``A`` with ``A Aᵀ = M⁻¹`` for sampling: with ``W = Λ^{-1/2} V = Q_W R``
  (thin QR) and ``R Rᵀ = P E Pᵀ``,
  ``A = Λ^{-1/2} (I + Q_W P ((1 + E)^{-1/2} − 1) Pᵀ Q_Wᵀ)``, since
  ``(I + W Wᵀ)^{-1/2}`` acts as ``(1 + E)^{-1/2}`` on the range of ``W`` and as
  the identity elsewhere;
* the diagonal of ``M⁻¹``.

:func:`nystrom_eigenpairs` finds ``U S Uᵀ`` from a sketch ``Y = R Ω`` that one pass
over the per-example rows accumulates, without forming ``R``.

All functions take ``Λ`` as a vector ``(n,)`` and ``V`` as ``(n, k)``; right-hand
sides are rows ``(m, n)``, each row ``x`` mapped to ``M x`` (a sample or a
Jacobian row in its own layout, without a transposed copy).
"""

from __future__ import annotations

import torch
from torch import Tensor


def capacitance_cholesky(lam: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """``Λ⁻¹ V`` and the Cholesky factor ``L`` of ``C = I + Vᵀ Λ⁻¹ V = L Lᵀ``.

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        V: ``(n, k)``.

    Returns:
        ``(Λ⁻¹ V, L)``, shapes ``(n, k)`` and ``(k, k)``.
    """
    scaled = V / lam.unsqueeze(-1)
    capacitance = V.mT @ scaled
    capacitance = capacitance + torch.eye(V.shape[-1], dtype=V.dtype, device=V.device)
    return scaled, torch.linalg.cholesky(capacitance)


def matmul(lam: Tensor, V: Tensor, X: Tensor) -> Tensor:
    """``M x = Λ x + V (Vᵀ x)`` of each row ``x``.

    Args:
        lam: ``Λ`` ``(n,)``.
        V: ``(n, k)``.
        X: Rows ``(m, n)``.

    Returns:
        ``(m, n)``.
    """
    return X * lam + (X @ V) @ V.mT


def inverse_matmul(lam: Tensor, V: Tensor, X: Tensor) -> Tensor:
    """``M⁻¹ x`` of each row by Woodbury: ``Λ⁻¹ x − Λ⁻¹ V C⁻¹ Vᵀ Λ⁻¹ x``.

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        V: ``(n, k)``.
        X: Rows ``(m, n)``.

    Returns:
        ``(m, n)``.
    """
    return whitened_inverse_matmul(lam, whitened_inverse(lam, V), X)


def whitened_inverse_matmul(lam: Tensor, W: Tensor, X: Tensor) -> Tensor:
    """``M⁻¹ x = Λ⁻¹ x − W (Wᵀ x)`` of each row, ``W`` from :func:`whitened_inverse`.

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        W: ``Λ⁻¹ V L^{-T}`` ``(n, k)`` (kept by a caller that applies it often).
        X: Rows ``(m, n)``.

    Returns:
        ``(m, n)``.
    """
    return X / lam - (X @ W) @ W.mT


def logdet(lam: Tensor, V: Tensor) -> Tensor:
    """``log det M = Σ log Λ + log det C`` (the matrix determinant lemma).

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        V: ``(n, k)``.

    Returns:
        A scalar, differentiable in ``Λ`` and ``V``.
    """
    return lam.log().sum() + capacitance_logdet(lam, V)


def capacitance_logdet(lam: Tensor, V: Tensor) -> Tensor:
    """``log det C``: what the low-rank term adds to ``log det Λ``.

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        V: ``(n, k)``.

    Returns:
        A scalar, differentiable in ``Λ`` and ``V``.
    """
    _, chol = capacitance_cholesky(lam, V)
    return 2 * chol.diagonal().log().sum()


def whitened_inverse(lam: Tensor, V: Tensor) -> Tensor:
    """``Λ⁻¹ V L^{-T}`` ``(n, k)``: ``M⁻¹ = Λ⁻¹ − (Λ⁻¹ V L^{-T})(Λ⁻¹ V L^{-T})ᵀ``.

    ``L⁻ᵀ`` is formed (``k × k``; ``C ≽ I``, so its norm is at most 1) and applied
    in one product: three passes over the ``n × k`` numbers in all.

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        V: ``(n, k)``.

    Returns:
        ``(n, k)``.
    """
    scaled, chol = capacitance_cholesky(lam, V)
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    return scaled @ torch.linalg.solve_triangular(chol, eye, upper=False).mT


def inverse_diagonal(lam: Tensor, V: Tensor) -> Tensor:
    """``diag(M⁻¹) = 1/Λ − rowsum((Λ⁻¹ V L^{-T})²)``.

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        V: ``(n, k)``.

    Returns:
        ``(n,)``.
    """
    return 1 / lam - whitened_inverse(lam, V).square().sum(1)


def inverse_factor(lam: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """The low-rank part of ``A`` with ``A Aᵀ = M⁻¹``: ``A = Λ^{-1/2} (I + B Bᵀ)``.

    ``B = Q_W P ((1 + E)^{-1/2} − 1)^{1/2}`` is not formed; returned are
    ``Q_W P`` ``(n, k)`` and the weights ``(1 + E)^{-1/2} − 1`` ``(k,)`` (in
    ``(−1, 0]``), so that ``A z = Λ^{-1/2} (z + Q_W P diag(w) Pᵀ Q_Wᵀ z)``
    (:func:`apply_inverse_factor`).

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        V: ``(n, k)``.

    Returns:
        ``(Q_W P, w)``.
    """
    W = V / lam.sqrt().unsqueeze(-1)
    q_w, r = torch.linalg.qr(W)  # thin: (n, k), (k, k)
    e, p = torch.linalg.eigh(r @ r.mT)
    weights = (1 + e.clamp_min(0)).rsqrt() - 1
    return q_w @ p, weights


def inverse_factor_matmul(lam: Tensor, V: Tensor, Z: Tensor) -> Tensor:
    """``A z`` of each row for the factor ``A Aᵀ = M⁻¹`` of :func:`inverse_factor`.

    With standard normal rows ``z``, the rows ``A z`` have covariance ``M⁻¹``.

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        V: ``(n, k)``.
        Z: Rows ``(m, n)``.

    Returns:
        ``(m, n)``.
    """
    return apply_inverse_factor(lam, *inverse_factor(lam, V), Z)


def apply_inverse_factor(
    lam: Tensor, basis: Tensor, weights: Tensor, Z: Tensor
) -> Tensor:
    """``A z = Λ^{-1/2} (z + Q_W P diag(w) Pᵀ Q_Wᵀ z)`` of each row.

    Args:
        lam: ``Λ``, positive, ``(n,)``.
        basis: ``Q_W P`` ``(n, k)``.
        weights: ``w`` ``(k,)``.
        Z: Rows ``(m, n)``.

    Returns:
        ``(m, n)``.
    """
    return (Z + ((Z @ basis) * weights) @ basis.mT) / lam.sqrt()


def nystrom_eigenpairs(
    sketch: Tensor, omega: Tensor, rank: int
) -> tuple[Tensor, Tensor]:
    """The top eigenpairs of the Nyström approximation ``Y (Ωᵀ Y)⁺ Yᵀ`` of ``R``.

    ``Y = R Ω`` for a positive semi-definite ``R``. The approximation ``R̂`` is
    positive semi-definite and ``R̂ ≼ R`` (so ``diag(R − U S Uᵀ) ≥ 0``); it is
    exact where ``R`` has rank at most the sketch's columns. Computed stably
    (Tropp et al. 2017, "Fixed-rank approximation of a positive-semidefinite
    matrix from streaming data"): a small shift ``ν`` makes ``Ωᵀ (Y + ν Ω)``
    positive definite, and is taken off the eigenvalues again.

    Args:
        sketch: ``Y = R Ω`` ``(n, l)``.
        omega: ``Ω`` ``(n, l)``.
        rank: ``k ≤ l``: the pairs kept.

    Returns:
        ``(U, S)``: orthonormal ``(n, k')`` and non-negative ``(k',)``, largest
        first, ``k' = min(k, n)``.
    """
    # In the sketch's precision (float64, or float32 for a float32 model: the tall
    # products are the cost, and their errors are the shift's order anyway).
    dtype = sketch.dtype
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    Y, test = sketch.to(work), omega.to(work)
    n = Y.shape[0]
    shift = torch.finfo(work).eps * n * max(float(Y.norm()), 1e-30)
    shifted = Y + shift * test
    core = test.mT @ shifted
    core = (core + core.mT) / 2
    # A tiny eigenvalue of the core (a sketch of a matrix of lower rank) is
    # lifted so that the Cholesky factor exists; the shift absorbs it.
    eigenvalues = torch.linalg.eigvalsh(core)
    lift = max(0.0, -float(eigenvalues[0])) + shift * float(test.norm()) ** 2 * 1e-12
    chol = torch.linalg.cholesky(
        core + lift * torch.eye(len(core), dtype=Y.dtype, device=Y.device)
    )
    factor = torch.linalg.solve_triangular(chol, shifted.mT, upper=False).mT
    # The left singular vectors of the tall factor F from the l × l Gram matrix
    # FᵀF = V Σ² Vᵀ (U = F V Σ⁻¹, then made orthonormal again): a third of a thin
    # SVD's time on a block of 400,000 entries.
    squares, right = torch.linalg.eigh(factor.mT @ factor)
    squares, right = squares.flip(0), right.flip(1)
    keep = min(rank, n, len(squares))
    values = (squares[:keep] - shift).clamp_min(0)
    sigma = squares[:keep].clamp_min(torch.finfo(work).tiny).sqrt()
    U = orthonormal_columns((factor @ right[:, :keep]) / sigma)
    return U.to(dtype), values.to(dtype)


def orthonormal_columns(Y: Tensor, rounds: int = 2) -> Tensor:
    """An orthonormal basis of the range of a tall ``Y`` ``(n, l)``.

    Cholesky QR, twice (Fukaya et al. 2014): ``Q = Y L^{-T}`` with
    ``YᵀY + s I = L Lᵀ``, where the small shift ``s`` keeps a rank-deficient
    ``Y`` factorable; the second round restores orthonormality to round-off.
    Only ``l × l`` factorizations and two products with ``Y``: faster than a
    Householder QR of a tall matrix.

    Args:
        Y: ``(n, l)``.
        rounds: ``1`` gives a well-conditioned basis (a test matrix needs no
            more), ``2`` an orthonormal one.

    Returns:
        ``(n, l)`` with ``QᵀQ = I`` to round-off (after two rounds), in ``Y``'s
        dtype (float32 for lower precisions; its columns beyond ``Y``'s rank span
        directions of round-off).
    """
    Q = Y if Y.dtype in (torch.float32, torch.float64) else Y.float()
    eye = torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device)
    for _ in range(rounds):
        gram = Q.mT @ Q
        shift = torch.finfo(Q.dtype).eps * max(float(gram.diagonal().sum()), 1e-300)
        chol = torch.linalg.cholesky((gram + gram.mT) / 2 + shift * eye)
        Q = torch.linalg.solve_triangular(chol, Q.mT, upper=False).mT
    return Q

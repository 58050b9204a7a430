r"""The sketch ``Y = R Ω`` of a Kronecker block's rotated curvature, and its correction.

A block's rotated curvature ``R = Qᵀ B Q = Σ_r r rᵀ`` sums the outer products of
its rotated per-example (pseudo-)gradients ``r`` (one per example and backward
pass). EKFAC keeps ``diag(R)``; the low-rank correction (``correction_rank = k``)
keeps also the top-``k`` eigenpairs ``U S Uᵀ`` of ``R``, from two sketches
``Y = R Ω = Σ_r r (rᵀ Ω)`` of ``l = 2k`` columns (a randomized subspace iteration
with one power step; Halko, Martinsson & Tropp 2011):

1. in the correction pass, ``Y₁ = R Ω`` with a Khatri–Rao test matrix
   ``Ω_{:,j} = ω^{(1)}_j ⊗ … ⊗ ω^{(m)}_j`` (standard normal vectors, one per
   dimension of the block): for a layer without weight sharing ``r = g̃ ⊗ ã`` and
   ``rᵀ Ω_j = (g̃ᵀ ω_j)(ãᵀ η_j)`` costs ``l (d_out + d_in)``, and ``Y₁`` one
   ``(l d_out × B)(B × d_in)`` product per batch;
2. in one more pass over the sketched examples, ``Y₂ = R Q₁`` with ``Q₁`` an
   orthonormal basis of ``Y₁``'s range; ``U S Uᵀ`` is the Nyström approximation
   ``Y₂ (Q₁ᵀ Y₂)⁺ Y₂ᵀ`` (:func:`~ekfac_laplace.lowrank.nystrom_eigenpairs`). On
   the digits MLP the power step halved the gap to the exact top-8 eigenpairs'
   predictive (one sketch of ``2k`` or ``4k`` columns did not).

A block of at most ``l`` entries is sketched with ``Ω = I`` (``Y = R``: its
correction is exact, and needs no second sketch). The block becomes

$$
    P_b = Q \big(D + U S U^\top\big) Q^\top , \qquad
    D = \max\big(\mathrm{diag}(R - U S U^\top), 0\big) .
$$

The sketches see only the first ``correction_examples`` examples of each layer
(whole batches), their sums scaled by ``N / N_sketched``; the exact diagonal of
``R`` still comes from every example. Two fits' corrections (online fitting) are
merged as the top-``k`` eigenpairs of ``U_A S_A U_Aᵀ + U_B S_B U_Bᵀ``
(:func:`merged_eigenpairs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ekfac_laplace import lowrank
from ekfac_laplace.matrix import EKFACDecomposed

#: The sketch's columns per kept eigenpair (``l = OVERSAMPLING · k``).
OVERSAMPLING = 2


def sketch_columns(rank: int) -> int:
    """The columns ``l`` of a rank-``k`` correction's sketch: ``2k``."""
    return OVERSAMPLING * rank


def block_seed(seed: int, index: int) -> int:
    """The seed of block ``index``'s test matrix: the same on every rank and fit."""
    return (7919 * (index + 1) + 104729 * seed) % 2**63


@dataclass
class CurvatureSketch:
    """``Y = R Ω`` of one block, summed over the examples it saw.

    Attributes:
        shape: The block's eigenvalue shape (``(d_out, d_in)``, ``(d_out,)``, with a
            leading ``G`` for a grouped layer).
        values: ``Y`` as ``(l, *shape)``, or ``R`` itself ``(n, n)`` where
            ``Ω = I`` (:attr:`exact`).
        factors: A Khatri–Rao test matrix's factors, ``(l, shape[i])`` each:
            ``Ω_{:,j} = ⊗_i factors[i][j]``; empty otherwise.
        test: A dense test matrix ``(n, l)`` (the power step's ``Q₁``), or
            ``None``.
    """

    shape: tuple[int, ...]
    values: Tensor
    factors: tuple[Tensor, ...] = ()
    test: Tensor | None = None

    def __post_init__(self) -> None:
        # The dense test matrix stored as its columns laid out as the block, for
        # the rank-one rows; ``test`` is a view of them.
        self._columns = None
        if self.test is not None:
            self._columns = self.test.mT.reshape(-1, *self.shape).contiguous()
            self.test = self._columns.view(len(self._columns), -1).mT

    @classmethod
    def new(
        cls,
        shape: Sequence[int],
        rank: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> CurvatureSketch:
        """An empty first sketch of a block for a rank-``k`` correction.

        Args:
            shape: The block's eigenvalue shape.
            rank: ``k``.
            seed: The test matrix's seed (:func:`block_seed`).
            dtype: The accumulation dtype.
            device: Where the sums live.

        Returns:
            Zeros, with the Khatri–Rao test matrix drawn (``Ω = I`` for a block of
            at most ``2k`` entries).
        """
        shape = tuple(shape)
        n = int(torch.Size(shape).numel())
        columns = sketch_columns(rank)
        if n <= columns:  # Ω = I: R itself
            return cls(shape, torch.zeros(n, n, dtype=dtype, device=device))
        generator = torch.Generator().manual_seed(seed)
        factors = tuple(
            torch.randn(columns, size, generator=generator, dtype=torch.float64).to(
                dtype=dtype, device=device
            )
            for size in shape
        )
        values = torch.zeros(columns, *shape, dtype=dtype, device=device)
        return cls(shape, values, factors)

    def power_step(self) -> CurvatureSketch:
        """An empty second sketch, its test matrix ``Q₁`` the range of this ``Y``.

        Returns:
            Zeros ``(l, *shape)`` with ``test = Q₁`` ``(n, l)`` orthonormal.
        """
        Y = self.values.reshape(len(self.values), -1).mT
        test = lowrank.orthonormal_columns(Y, rounds=1).to(self.values.dtype)
        return CurvatureSketch(self.shape, torch.zeros_like(self.values), (), test)

    @property
    def exact(self) -> bool:
        """Whether ``Ω = I`` (the sketch is ``R``)."""
        return not self.factors and self.test is None

    @property
    def numel(self) -> int:
        """The block's size ``n``."""
        return int(torch.Size(self.shape).numel())

    def add_rows(self, rows: Tensor) -> None:
        """Add rotated per-example gradients ``r`` ``(m, *shape)``: ``Y += Σ r (rᵀ Ω)``.

        Args:
            rows: One row per example and pass, in the block's eigenbasis.
        """
        flat = rows.reshape(rows.shape[0], -1).to(self.values.dtype)
        if self.exact:
            self.values.addmm_(flat.mT, flat)
            return
        if self.test is not None:
            projections = flat @ self.test
        else:
            projections = self._project(rows.to(self.values.dtype))  # (m, l)
        self.values.view(projections.shape[1], -1).addmm_(projections.mT, flat)

    def add_rank_one(self, g: Tensor, a: Tensor) -> None:
        """Add ``r = g̃_{n,k} ⊗ ã_n`` (a weight without sharing).

        Args:
            g: Rotated output gradients, ``(B, K, d_out)``.
            a: Rotated inputs, ``(B, d_in)``.
        """
        g, a = g.to(self.values.dtype), a.to(self.values.dtype)
        if self.exact:
            self.add_rows((g.unsqueeze(-1) * a[:, None, None, :]).flatten(0, 1))
            return
        if self.test is not None:
            # rᵀ Q_j = g̃ᵀ Q_j ã: the test columns against the inputs first.
            columns, d_out, d_in = self._columns.shape  # (l·d_out × d_in)(d_in × B)
            projections = (self._columns.view(columns * d_out, d_in) @ a.mT).view(
                columns, d_out, -1
            )
            weights = torch.einsum("bko,job->bjk", g, projections)  # (B, l, K)
            T = torch.bmm(weights, g)  # (B, l, d_out)
        else:
            out_factor, in_factor = self.factors
            # T_{n,j} = Σ_k (g̃_nkᵀ ω_j) g̃_nk, then H_{n,j} = (ã_nᵀ η_j) T_{n,j}.
            T = torch.bmm((g @ out_factor.mT).mT, g)  # (B, l, d_out)
            T.mul_((a @ in_factor.mT).unsqueeze(-1))
        self.values.view(-1, a.shape[1]).addmm_(T.flatten(1).mT, a)

    def _project(self, rows: Tensor) -> Tensor:
        """``rᵀ Ω`` of each row ``(m, *shape)``: ``(m, l)``, a factor at a time."""
        factors = self.factors
        if len(factors) == 1:
            return rows @ factors[0].mT
        if len(factors) == 2:
            inner = rows @ factors[1].mT  # (m, d_out, l)
            return torch.einsum("moj,jo->mj", inner, factors[0])
        inner = rows @ factors[2].mT  # (m, G, d_out, l)
        return torch.einsum("mgoj,jg,jo->mj", inner, factors[0], factors[1])

    def omega(self) -> Tensor:
        """The test matrix ``Ω`` ``(n, l)`` (the identity where :attr:`exact`)."""
        if self.test is not None:
            return self.test
        if self.exact:
            return torch.eye(
                self.numel, dtype=self.values.dtype, device=self.values.device
            )
        columns = self.factors[0]
        for factor in self.factors[1:]:
            columns = (columns.unsqueeze(-1) * factor.unsqueeze(1)).flatten(1)
        return columns.mT

    def eigenpairs(self, rank: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """The top-``k`` eigenpairs ``(U, S)`` of ``scale · R`` (Nyström, or exact).

        Args:
            rank: ``k``.
            scale: ``N / N_sketched``.

        Returns:
            ``U`` ``(n, k')`` orthonormal and ``S ≥ 0`` ``(k',)``, largest first,
            ``k' = min(k, n)``.
        """
        if self.exact:
            R = self.values.double()
            values, vectors = torch.linalg.eigh((R + R.mT) / 2)
            keep = min(rank, self.numel)
            S = values.flip(0)[:keep].clamp_min(0) * scale
            U = vectors.flip(1)[:, :keep]
        else:
            Y = self.values.reshape(len(self.values), -1).mT
            U, S = lowrank.nystrom_eigenpairs(Y, self.omega().to(Y), rank)
            S = S * scale
        return U.to(self.values.dtype), S.to(self.values.dtype)


def transposed_columns(U: Tensor, shape: Sequence[int]) -> Tensor:
    """Columns ``(n, k)`` over ``(…, d_out, d_in)``, laid out ``(…, d_in, d_out)``.

    Args:
        U: The columns, row-major over ``shape``.
        shape: The block's shape in the accumulator's layout.

    Returns:
        ``(n, k)``, row-major over the transposed shape.
    """
    columns = U.mT.reshape(U.shape[1], *shape)
    return columns.mT.reshape(U.shape[1], -1).mT.contiguous()


def merged_eigenpairs(
    first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], rank: int
) -> tuple[Tensor, Tensor]:
    """The top-``k`` eigenpairs of ``U₁ S₁ U₁ᵀ + U₂ S₂ U₂ᵀ`` (an online fit).

    Args:
        first: ``(U₁, S₁)``.
        second: ``(U₂, S₂)``.
        rank: ``k``.

    Returns:
        ``(U, S)``, at most ``k`` pairs, largest first.
    """
    (U1, S1), (U2, S2) = first, second
    W = torch.cat([U1 * S1.clamp_min(0).sqrt(), U2 * S2.clamp_min(0).sqrt()], 1)
    dtype = W.dtype
    basis, singular, _ = torch.linalg.svd(W.double(), full_matrices=False)
    keep = min(rank, len(singular))
    return basis[:, :keep].to(dtype), singular[:keep].square().to(dtype)


def corrected_block(
    diagonal: Tensor, correction: tuple[Tensor, Tensor]
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``D = max(diag(R) − rowsum(U² S), 0)`` beside the correction ``(U, S)``.

    Args:
        diagonal: ``diag(R)`` in the block's shape.
        correction: ``(U, S)``.

    Returns:
        ``(D, (U, S))``, ``D`` of the block's shape.
    """
    U, S = correction
    U, S = U.to(diagonal), S.to(diagonal)
    kept = (U.square() @ S).reshape(diagonal.shape)
    return (diagonal.clamp_min(0) - kept).clamp_min(0), (U, S)


def corrected_matrix(
    eigenvectors: Sequence[tuple[Tensor, ...]],
    eigenvalues: Sequence[Tensor],
    corrections: Mapping[int, tuple[Tensor, Tensor]],
) -> EKFACDecomposed:
    """The curvature with every corrected block's ``D + U S Uᵀ`` (zero deltas).

    Args:
        eigenvectors: Per block, its eigenbasis.
        eigenvalues: Per block, ``diag(R)`` (EKFAC's eigenvalues).
        corrections: Block index to its ``(U, S)``.

    Returns:
        ``Q (D + U S Uᵀ) Qᵀ`` per corrected block, EKFAC elsewhere.
    """
    values = list(eigenvalues)
    blocks: list[tuple[Tensor, Tensor] | None] = [None] * len(values)
    for index, correction in corrections.items():
        values[index], blocks[index] = corrected_block(values[index], correction)
    return EKFACDecomposed(list(eigenvectors), values, corrections=blocks)

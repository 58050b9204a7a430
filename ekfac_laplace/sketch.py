r"""The sketch ``Y = R Ω`` of a Kronecker block's rotated curvature, and its correction.

A block's rotated curvature ``R = Qᵀ B Q = Σ_r r rᵀ`` sums the outer products of
its rotated per-example (pseudo-)gradients ``r`` (one per example and backward
pass). EKFAC keeps ``diag(R)``; the low-rank correction (``correction_rank = k``)
keeps also the top-``k`` eigenpairs ``U S Uᵀ`` of ``R``, found from a sketch

$$
    Y = R \, Ω = \sum_r r \, (r^\top Ω) , \qquad
    Ω_{:,j} = ω^{(1)}_j \otimes \dots \otimes ω^{(m)}_j ,
$$

whose ``l = 2k`` test vectors are Kronecker products of standard normal vectors,
one per dimension of the block (a Khatri–Rao test matrix): for a layer without
weight sharing, ``r = g̃ ⊗ ã`` and ``rᵀ Ω_j = (g̃ᵀ ω_j)(ãᵀ η_j)`` costs
``l (d_out + d_in)`` instead of ``l d_out d_in``, so that ``Y`` costs one
``(l d_out × B)(B × d_in)`` product per batch. A block of at most ``l`` entries is
sketched with ``Ω = I`` (``Y = R``: its correction is exact). ``U S Uᵀ`` is the
Nyström approximation of ``R`` from ``Y``
(:func:`~ekfac_laplace.lowrank.nystrom_eigenpairs`), and the block becomes

$$
    P_b = Q \big(D + U S U^\top\big) Q^\top , \qquad
    D = \max\big(\mathrm{diag}(R - U S U^\top), 0\big) .
$$

The sketch may see only the first ``correction_examples`` examples of each layer
(whole batches), its sum scaled by ``N / N_sketched``: the exact diagonal of ``R``
still comes from every example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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
            ``Ω = I`` (``factors`` empty).
        factors: The test matrix's factors, ``(l, shape[i])`` each:
            ``Ω_{:,j} = ⊗_i factors[i][j]``.
        seen: The examples of the layer (a tensor, summed over ranks).
        sketched: The examples the sketch saw.
        diagonal: ``diag(R)`` over every example, in the block's shape (EKFAC's
            eigenvalues; set once the fit has them).
    """

    shape: tuple[int, ...]
    values: Tensor
    factors: tuple[Tensor, ...]
    seen: Tensor
    sketched: Tensor
    diagonal: Tensor | None = None

    @classmethod
    def new(
        cls,
        shape: Sequence[int],
        rank: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> CurvatureSketch:
        """An empty sketch of a block for a rank-``k`` correction.

        Args:
            shape: The block's eigenvalue shape.
            rank: ``k``.
            seed: The test matrix's seed (:func:`block_seed`).
            dtype: The accumulation dtype.
            device: Where the sums live.

        Returns:
            Zeros, with the test matrix drawn.
        """
        shape = tuple(shape)
        n = int(torch.Size(shape).numel())
        columns = sketch_columns(rank)
        zero = torch.zeros((), dtype=dtype, device=device)
        if n <= columns:  # Ω = I: R itself
            values = torch.zeros(n, n, dtype=dtype, device=device)
            return cls(shape, values, (), zero.clone(), zero.clone())
        generator = torch.Generator().manual_seed(seed)
        factors = tuple(
            torch.randn(columns, size, generator=generator, dtype=torch.float64).to(
                dtype=dtype, device=device
            )
            for size in shape
        )
        values = torch.zeros(columns, *shape, dtype=dtype, device=device)
        return cls(shape, values, factors, zero.clone(), zero.clone())

    @property
    def exact(self) -> bool:
        """Whether ``Ω = I`` (the sketch is ``R``)."""
        return not self.factors

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
        if self.exact:
            return torch.eye(self.numel, dtype=self.values.dtype)
        columns = self.factors[0]
        for factor in self.factors[1:]:
            columns = (columns.unsqueeze(-1) * factor.unsqueeze(1)).flatten(1)
        return columns.mT

    def scaled_to_all(self) -> CurvatureSketch:
        """The sketch of every example's ``R``: ``Y · seen / sketched``.

        Returns:
            A new sketch with ``sketched = seen``.
        """
        sketched = float(self.sketched)
        ratio = float(self.seen) / sketched if sketched > 0 else 0.0
        values = self.values * ratio if ratio != 1.0 else self.values.clone()
        return CurvatureSketch(
            self.shape,
            values,
            self.factors,
            self.seen.clone(),
            self.seen.clone(),
            self.diagonal,
        )

    def with_diagonal(self, diagonal: Tensor) -> CurvatureSketch:
        """This sketch with ``diag(R)`` set."""
        return replace(self, diagonal=diagonal)

    def scaled(self, factor: float) -> CurvatureSketch:
        """The sketch of ``factor · R``."""
        diagonal = None if self.diagonal is None else self.diagonal * factor
        return replace(self, values=self.values * factor, diagonal=diagonal)

    def transposed(self) -> CurvatureSketch:
        """The sketch of a weight block laid out ``(d_in, d_out)``."""
        if self.exact:
            n_out, n_in = self.shape[-2:]
            lead = self.shape[:-2]
            order = torch.arange(self.numel).reshape(*lead, n_out, n_in)
            order = order.mT.flatten()
            values = self.values[order][:, order]
        else:
            values = self.values.mT.contiguous()
        factors = (*self.factors[:-2], *self.factors[-2:][::-1])
        shape = (*self.shape[:-2], self.shape[-1], self.shape[-2])
        diagonal = None if self.diagonal is None else self.diagonal.mT.contiguous()
        return CurvatureSketch(
            shape, values, factors, self.seen, self.sketched, diagonal
        )

    def __add__(self, other: CurvatureSketch) -> CurvatureSketch:
        """The sketch of the sum of two data sets' ``R`` (the same ``Ω``)."""
        if self.shape != other.shape or self.values.shape != other.values.shape:
            raise ValueError(
                f"Cannot add the sketches of blocks of shapes {self.shape} and "
                f"{other.shape} with {self.values.shape} and {other.values.shape} "
                "sums: fit both with the same correction_rank."
            )
        diagonal = None
        if self.diagonal is not None and other.diagonal is not None:
            diagonal = self.diagonal + other.diagonal
        return CurvatureSketch(
            self.shape,
            self.values + other.values,
            self.factors,
            self.seen + other.seen,
            self.sketched + other.sketched,
            diagonal,
        )

    def eigenpairs(self, rank: int) -> tuple[Tensor, Tensor]:
        """The top-``k`` eigenpairs ``(U, S)`` of ``R`` (Nyström, or exact).

        Args:
            rank: ``k``.

        Returns:
            ``U`` ``(n, k')`` orthonormal and ``S ≥ 0`` ``(k',)``, ``k' = min(k, n)``.
        """
        if self.exact:
            R = self.values.double()
            values, vectors = torch.linalg.eigh((R + R.mT) / 2)
            keep = min(rank, self.numel)
            order = values.flip(0)[:keep].clamp_min(0)
            U = vectors.flip(1)[:, :keep]
            return U.to(self.values.dtype), order.to(self.values.dtype)
        Y = self.values.reshape(len(self.values), -1).mT
        return lowrank.nystrom_eigenpairs(Y, self.omega().to(Y), rank)

    def state(self) -> dict[str, object]:
        """The sketch in plain form, to save.

        Returns:
            ``{"shape", "values", "factors", "seen", "sketched", "diagonal"}``.
        """
        return {
            "shape": list(self.shape),
            "values": self.values,
            "factors": list(self.factors),
            "seen": self.seen,
            "sketched": self.sketched,
            "diagonal": self.diagonal,
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> CurvatureSketch:
        """The inverse of :meth:`state`."""
        return cls(
            tuple(state["shape"]),
            state["values"],
            tuple(state["factors"]),
            state["seen"],
            state["sketched"],
            state["diagonal"],
        )


def corrected_block(
    sketch: CurvatureSketch, rank: int
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``D`` and ``(U, S)`` of a block: ``D = max(diag(R) − rowsum(U² S), 0)``.

    Args:
        sketch: Its sketch (of every example's ``R``, with ``diag(R)``).
        rank: ``k``.

    Returns:
        ``(D, (U, S))``, ``D`` of the block's shape.
    """
    diagonal = sketch.diagonal.clamp_min(0)
    U, S = sketch.eigenpairs(rank)
    U, S = U.to(diagonal), S.to(diagonal)
    kept = (U.square() @ S).reshape(diagonal.shape)
    return (diagonal - kept).clamp_min(0), (U, S)


def corrected_matrix(
    eigenvectors: Sequence[tuple[Tensor, ...]],
    eigenvalues: Sequence[Tensor],
    sketches: dict[int, CurvatureSketch],
    rank: int,
) -> EKFACDecomposed:
    """The curvature with every sketched block corrected (zero deltas).

    Args:
        eigenvectors: Per block, its eigenbasis.
        eigenvalues: Per block, its eigenvalues (a sketched block's are replaced).
        sketches: Block index to its sketch, with ``diag(R)``.
        rank: ``k``.

    Returns:
        ``Q (D + U S Uᵀ) Qᵀ`` per sketched block, EKFAC elsewhere.
    """
    values = list(eigenvalues)
    corrections: list[tuple[Tensor, Tensor] | None] = [None] * len(values)
    for index, sketch in sketches.items():
        values[index], corrections[index] = corrected_block(sketch, rank)
    return EKFACDecomposed(list(eigenvectors), values, corrections=corrections)

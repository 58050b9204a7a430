r"""The exact block of a small tensor: ``B = Σ_n Σ_k j_{n,k} j_{n,k}ᵀ = Q diag(λ) Qᵀ``.

EKFAC approximates each tensor's block of the GGN / Fisher within a Kronecker
eigenbasis; most of what separates it from the exact block lies there. A tensor of
``n ≤ dense_blocks_up_to`` entries keeps its exact block instead: ``n²`` numbers and
one ``eigh``, stored as one basis ``(Q,)`` with eigenvalues ``(n,)``, so that the
inverse, log determinant, samples and predictive stay exact. An online fit rebuilds
the block, ``Q diag(λ) Qᵀ + B_new``, and decomposes it again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ekfac_laplace.blocks.base import BlockStructure, add_gram
from ekfac_laplace.eigh import robust_eigh
from ekfac_laplace.options import EKFACOptions


class Exact(BlockStructure):
    """``Σ j jᵀ``, decomposed once (``dense_blocks_up_to``)."""

    name = "exact"
    priority = 10

    def claims(self, param: Tensor, options: EKFACOptions) -> bool:  # noqa: D102
        return param.numel() <= options.dense_blocks_up_to

    def shapes(  # noqa: D102
        self, param: Tensor
    ) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        n = param.numel()
        return (n,), [(n, n)]

    def start(self, param: Tensor, dtype: torch.dtype) -> Tensor:  # noqa: D102
        n = param.numel()
        return torch.zeros(n, n, dtype=dtype, device=param.device)

    def accumulate(self, total: Tensor, rows: Tensor) -> None:  # noqa: D102
        add_gram(total, rows)

    def decompose(  # noqa: D102
        self, total: Tensor, param: Tensor, description: str
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        values, basis = robust_eigh(total, description)
        return (basis,), values

    def merged(  # noqa: D102
        self,
        basis: Sequence[Tensor],
        values: Tensor,
        total: Tensor,
        param: Tensor,
        description: str,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        (q,) = basis
        block = (q * values) @ q.T + total.to(q.dtype)
        return self.decompose(block, param, description)

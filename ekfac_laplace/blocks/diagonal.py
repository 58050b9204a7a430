r"""The exact diagonal of the curvature, ``λ_i = Σ_n Σ_k (j_{n,k})_i²``, basis ``()``.

EKFAC in the identity basis: every tensor no Kronecker kind factorises (norm layers,
embeddings, recurrent layers, any module; :mod:`ekfac_laplace.module_kinds`) gets its
exact diagonal. The engine feeds it through
:class:`~ekfac_laplace.accumulators.DiagonalSquares`, which squares restricted rows
(an embedding's used rows) and sums a tied parameter's uses first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ekfac_laplace.blocks.base import BlockStructure


class Diagonal(BlockStructure):
    """The exact diagonal (the fallback of every tensor)."""

    name = "diagonal"
    priority = -100

    def shapes(  # noqa: D102
        self, param: Tensor
    ) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        return tuple(param.shape), []

    def start(self, param: Tensor, dtype: torch.dtype) -> Tensor:  # noqa: D102
        return torch.zeros(param.numel(), dtype=dtype, device=param.device)

    def accumulate(self, total: Tensor, rows: Tensor) -> None:  # noqa: D102
        total += rows.square().sum(0)

    def decompose(  # noqa: D102
        self, total: Tensor, param: Tensor, description: str
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        return (), total.reshape(param.shape)

    def merged(  # noqa: D102
        self,
        basis: Sequence[Tensor],
        values: Tensor,
        total: Tensor,
        param: Tensor,
        description: str,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        return (), values + total.reshape(values.shape).to(values.dtype)

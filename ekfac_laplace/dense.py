r"""Exact (dense) curvature blocks of small parameter tensors.

EKFAC approximates each parameter tensor's block of the GGN / Fisher within a
Kronecker eigenbasis; most of what separates it from the exact block lies there.
A tensor of ``n`` entries can instead keep its exact block,

$$
    B = \sum_n \sum_k j_{n,k} j_{n,k}^\top = Q \,\mathrm{diag}(λ)\, Q^\top ,
$$

with ``j_{n,k}`` its per-example (pseudo-)gradients, the same ones the engine
squares for the corrected eigenvalues: ``n²`` numbers and one ``eigh``. Stored as
one basis ``(Q,)`` with eigenvalues ``λ`` ``(n,)``, it fits the posterior matrix as
any other block does (:class:`~ekfac_laplace.matrix.EKFACDecomposed`), so the
inverse, log determinant, samples and Jacobian-free predictive stay exact.

:class:`DenseBlocks` accumulates ``B`` in the passes the engine makes anyway: for a
Kronecker layer's weight from ``j = vec(Σ_s g_s a_sᵀ)``, its bias from
``Σ_s g_s``, and, for an output layer whose output is the model's (no backward
pass), in closed form from the loss curvature ``Λ_n``,
``B = Σ_n Λ_n ⊗ a_n a_nᵀ``; for a module with diagonal blocks
(:class:`~ekfac_laplace.accumulators.DiagonalSquares`), from its per-example
gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ekfac_laplace.diagonal import CHUNK_NUMBERS
from ekfac_laplace.eigh import robust_eigh
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.layout import KroneckerLayer, ParameterLayout
from ekfac_laplace.output_curvature import OutputCurvature


class DenseBlocks:
    """Sums ``Σ j jᵀ`` for every parameter tensor with an exact block.

    Args:
        layout: The parameter layout (its ``dense`` blocks).

    Attributes:
        blocks: Block index to its accumulated ``(n, n)`` matrix.
    """

    def __init__(self, layout: ParameterLayout) -> None:
        self.blocks: dict[int, Tensor] = {}
        for index in sorted(layout.dense):
            param = layout.params[index]
            dtype = accumulation_dtype(param.dtype)
            n = param.numel()
            self.blocks[index] = torch.zeros(n, n, dtype=dtype, device=param.device)

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def partial_sums(self) -> list[Tensor]:
        """The blocks in index order, to sum over the ranks (in place).

        Returns:
            The tensors themselves.
        """
        return list(self.blocks.values())

    def add(self, index: int, gradients: Tensor) -> None:
        """Add per-example gradients of one parameter tensor.

        Args:
            index: Its block index.
            gradients: Shape ``(R, n)`` (or ``(R, *shape)``), one row per example
                (and backward pass).
        """
        block = self.blocks[index]
        rows = gradients.reshape(gradients.shape[0], -1).to(block.dtype)
        chunk = max(1, CHUNK_NUMBERS // max(rows.shape[1], 1))
        for start in range(0, rows.shape[0], chunk):
            part = rows[start : start + chunk]
            block.addmm_(part.T, part)

    def gradient(
        self,
        layer: KroneckerLayer,
        a: Tensor,
        g: Tensor | None,
        bias_rows: Tensor | None = None,
    ) -> None:
        """One backward pass of a layer with exact blocks.

        Args:
            layer: The layer.
            a: Its inputs ``(B, S, G·d_in)``.
            g: Its output gradients ``(B, S, G·d_out)``, if its blocks need them.
            bias_rows: A separate bias's rows ``(B, S_b, d_b)``, if needed.
        """
        if layer.dense_weight_index is not None:
            groups = layer.groups
            per_example = torch.einsum(
                "bsgo,bsgi->bgoi",
                g.reshape(*g.shape[:2], groups, -1),
                a.reshape(*a.shape[:2], groups, -1),
            )  # each example's gradient, in the layout of as_groups
            weight = layer.kind.from_groups(per_example, layer.weight.shape)
            self.add(layer.dense_weight_index, weight)
        if layer.dense_bias_index is not None:
            rows = bias_rows if layer.kind.separate_bias else g
            self.add(layer.dense_bias_index, rows.sum(1))

    def output(
        self, layer: KroneckerLayer, a: Tensor, curvature: OutputCurvature
    ) -> None:
        """An output layer's exact blocks in closed form, ``Σ_n Λ_n ⊗ a_n a_nᵀ``.

        Args:
            layer: The layer (its output is the model output, one position).
            a: Its inputs ``(B, 1, d_in)``.
            curvature: The batch's output curvature (``Λ_n = Σ_k v v ᵀ``).
        """
        vectors = curvature.vectors().to(a.dtype)  # (B, K, C)
        if layer.dense_bias_index is not None:
            self.add(layer.dense_bias_index, vectors.flatten(0, 1))
        if layer.dense_weight_index is None:
            return
        inputs = a[:, 0]
        block = self.blocks[layer.dense_weight_index]
        C, d_in = vectors.shape[2], inputs.shape[1]
        # C(C+1)/2 products of (d_in × B)(B × d_in), not K C² d_in² per example.
        hessians = torch.einsum("bkc,bkd->bcd", vectors, vectors)
        view = block.view(C, d_in, C, d_in)
        for c in range(C):  # B[c, :, e, :] = Σ_n Λ_n[c, e] a_n a_nᵀ
            for e in range(c, C):
                part = (inputs * hessians[:, c, e, None]).T @ inputs
                view[c, :, e, :] += part
                if e != c:
                    view[e, :, c, :] += part.T


def decompose(block: Tensor, description: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of an exact block (robust to ``eigh``).

    Args:
        block: The symmetric positive semi-definite block.
        description: What it is, for messages.

    Returns:
        ``(λ, Q)``: the block's eigenvalues (``diag(Qᵀ B Q)``) and eigenvectors.
    """
    return robust_eigh(block, description)


def merged(
    basis: Tensor, eigenvalues: Tensor, new: Tensor, description: str
) -> tuple[Tensor, Tensor]:
    """An exact block plus more data's: ``Q diag(λ) Qᵀ + B``, decomposed again.

    Online fitting keeps EKFAC's Kronecker bases; an exact block needs no basis of
    its own to be exact, so it is rebuilt and decomposed again.

    Args:
        basis: The previous ``Q``.
        eigenvalues: The previous ``λ``.
        new: The new data's block ``B``.
        description: What it is, for messages.

    Returns:
        ``(λ, Q)`` of the sum.
    """
    total = (basis * eigenvalues) @ basis.T + new.to(basis.dtype)
    return decompose(total, description)

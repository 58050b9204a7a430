r"""The sums of per-example structures in the engine's passes: exact blocks first.

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

from ekfac_laplace.blocks import BlockStructure, structure_named
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.layer import KroneckerLayer
from ekfac_laplace.layout import EXACT, ParameterLayout
from ekfac_laplace.output_curvature import OutputCurvature


class DenseBlocks:
    """The sums of every tensor with a per-example structure (exact: ``Σ j jᵀ``).

    Each block's structure (:mod:`ekfac_laplace.blocks`) says what it sums of the
    per-example gradient rows handed here, and how it is decomposed.

    Args:
        layout: The parameter layout (its per-example blocks).

    Attributes:
        blocks: Block index to what its structure accumulated (exact: ``(n, n)``).
        structures: Block index to its structure.
    """

    def __init__(self, layout: ParameterLayout) -> None:
        self.blocks: dict[int, Tensor] = {}
        self.structures: dict[int, BlockStructure] = {}
        self.params = layout.params
        for index, name in sorted(layout.row_structures.items()):
            param = layout.params[index]
            structure = structure_named(name)
            self.structures[index] = structure
            self.blocks[index] = structure.start(param, accumulation_dtype(param.dtype))

    def decompose(
        self, index: int, description: str
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """Block ``index``'s eigenbasis and eigenvalues, by its structure.

        Args:
            index: The block.
            description: What it is, for messages.

        Returns:
            ``(Q_b, λ_b)``.
        """
        return self.structures[index].decompose(
            self.blocks[index], self.params[index], description
        )

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
        self.structures[index].accumulate(block, rows)

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
        index = layer.dense_weight_index
        if index is None:
            return
        inputs = a[:, 0]
        if self.structures[index].name != EXACT:  # rows v_{n,k} ⊗ a_n, in its layout
            rows = torch.einsum("bkc,bd->bkcd", vectors, inputs).flatten(0, 1)
            weight = layer.kind.from_groups(rows.unsqueeze(1), layer.weight.shape)
            self.add(index, weight)
            return
        block = self.blocks[layer.dense_weight_index]
        C, d_in = vectors.shape[2], inputs.shape[1]
        # C(C+1)/2 products of (d_in × B)(B × d_in), not K C² d_in² per example.
        hessians = torch.einsum("bkc,bkd->bcd", vectors, vectors)
        view = block.view(C, d_in, C, d_in)
        if layer.transposed:  # the weight laid out (d_in, C): its entries (i, c)
            view = block.view(d_in, C, d_in, C).permute(1, 0, 3, 2)
        for c in range(C):  # B[c, :, e, :] = Σ_n Λ_n[c, e] a_n a_nᵀ
            for e in range(c, C):
                part = (inputs * hessians[:, c, e, None]).T @ inputs
                view[c, :, e, :] += part
                if e != c:
                    view[e, :, c, :] += part.T

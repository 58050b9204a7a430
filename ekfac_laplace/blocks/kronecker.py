r"""EKFAC: ``(Q_G ⊗ Q_A) diag(λ) (Q_G ⊗ Q_A)ᵀ`` with corrected eigenvalues.

The block of a layer of a registered kind (:mod:`ekfac_laplace.kinds`). Its
accumulation is not per example: the Kronecker factors ``A = Σ a aᵀ`` and
``G = Σ g gᵀ`` from the layer's inputs and output gradients, their eigenbases, and
the corrected eigenvalues ``λ = Σ_n ((Q_G ⊗ Q_A)ᵀ j_n)²``
(:mod:`ekfac_laplace.accumulators`). A weight has eigenvectors ``(Q_G, Q_A)``
(transposed for a kind whose rows run over the inputs first; ``G`` stacked bases for
a grouped layer), a bias ``(Q_G,)`` or a factor of its own.
"""

from __future__ import annotations

from torch import Tensor

from ekfac_laplace.blocks.base import BlockStructure


class Kronecker(BlockStructure):
    """EKFAC's Kronecker eigenbasis with corrected eigenvalues.

    Not claimed by tensor: a layer of a registered kind whose parameters pass the
    layout's and the layer check's tests has it. Its shapes are its layer's
    (:meth:`~ekfac_laplace.layer.KroneckerLayer.block_shapes`).
    """

    name = "kronecker"
    per_example = False

    def shapes(  # noqa: D102
        self, param: Tensor
    ) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        raise TypeError(
            "A Kronecker block's shapes are its layer's: KroneckerLayer.block_shapes."
        )

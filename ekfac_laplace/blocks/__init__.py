"""The registry of block structures: what each parameter tensor's block can be.

:mod:`~ekfac_laplace.blocks.base` says what a structure declares; importing this
package registers the three built in:

* :mod:`~ekfac_laplace.blocks.kronecker`: EKFAC, ``(Q_G ⊗ Q_A) diag(λ) (Q_G ⊗ Q_A)ᵀ``
  with corrected eigenvalues, for the layers of a registered kind;
* :mod:`~ekfac_laplace.blocks.exact`: the exact block ``Σ j jᵀ = Q diag(λ) Qᵀ`` of a
  small tensor (``dense_blocks_up_to``);
* :mod:`~ekfac_laplace.blocks.diagonal`: the exact diagonal, for every other tensor.
"""

from ekfac_laplace.blocks import diagonal, exact, kronecker
from ekfac_laplace.blocks.base import (
    BlockStructure,
    claiming_structure,
    registered_structures,
    structure_named,
)

__all__ = [
    "BlockStructure",
    "claiming_structure",
    "diagonal",
    "exact",
    "kronecker",
    "registered_structures",
    "structure_named",
]

"""The kinds of Kronecker-factored layers, each declared in one module.

:class:`~ekfac_laplace.kinds.base.LayerKind` says what a kind declares; importing
this package registers every kind below (a new kind is one module here, imported
below, plus its tests in ``tests/kinds/``):

* :mod:`~ekfac_laplace.kinds.linear`: ``nn.Linear``;
* :mod:`~ekfac_laplace.kinds.convolution`: ``nn.Conv1d`` / ``2d`` / ``3d``;
* :mod:`~ekfac_laplace.kinds.transposed_convolution`: ``nn.ConvTranspose1d`` /
  ``2d`` / ``3d``;
* :mod:`~ekfac_laplace.kinds.gpt2_conv1d`: GPT-2's ``Conv1D``;
* :mod:`~ekfac_laplace.kinds.attention`: ``nn.MultiheadAttention``'s projections.
"""

from __future__ import annotations

from ekfac_laplace.kinds import (  # noqa: F401 - each registers its kinds
    attention,
    convolution,
    gpt2_conv1d,
    linear,
    transposed_convolution,
)
from ekfac_laplace.kinds.base import (
    LayerKind,
    kind_of,
    registered_kinds,
    unsupported_reason,
)

__all__ = ["LayerKind", "kind_of", "registered_kinds", "unsupported_reason"]

r"""What the EKFAC engine accumulates in its passes over the data.

A pass hands each Kronecker layer's inputs ``a`` (shape ``(B, S, d_in)``, ``S`` the
positions sharing the weight) and, one backward pass ``k`` at a time, its output
gradients ``g_k`` (``(B, S, d_out)``) to an accumulator
(:class:`~ekfac_laplace.accumulators.base.PassAccumulator`):

* :mod:`~ekfac_laplace.accumulators.factors`: the Kronecker factors ``A`` and ``G``
  and, within a memory budget, a cache of ``a`` and ``g`` for a replay;
* :mod:`~ekfac_laplace.accumulators.corrections`: the corrected eigenvalues in fixed
  eigenbases, from a second pass or from the replay;
* :mod:`~ekfac_laplace.accumulators.squares`: the squared per-example gradients of
  the parameters with diagonal blocks.

A layer whose output is the model output gets the curvature object itself
(:meth:`~ekfac_laplace.accumulators.base.PassAccumulator.output`) instead of
gradients: its factor and correction are closed-form (see
:class:`~ekfac_laplace.output_curvature.OutputCurvature`).
"""

from ekfac_laplace.accumulators.base import (
    CacheEntry,
    PassAccumulator,
    PerExampleGradients,
    per_example_numbers,
)
from ekfac_laplace.accumulators.corrections import (
    CorrectionAccumulator,
    contraction_order,
)
from ekfac_laplace.accumulators.factors import (
    GRAM_LEAF_COLUMNS,
    FactorAccumulator,
    add_upper_gram,
    mirror_upper,
)
from ekfac_laplace.accumulators.squares import DiagonalSquares

__all__ = [
    "GRAM_LEAF_COLUMNS",
    "CacheEntry",
    "CorrectionAccumulator",
    "DiagonalSquares",
    "FactorAccumulator",
    "PassAccumulator",
    "PerExampleGradients",
    "add_upper_gram",
    "contraction_order",
    "mirror_upper",
    "per_example_numbers",
]

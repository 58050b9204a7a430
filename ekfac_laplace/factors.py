r"""EKFAC factors of a data set and the scale they are in.

The engines compute, per parameter tensor, a Kronecker eigenbasis and the corrected
eigenvalues (George et al., 2018)

$$
    λ = \operatorname{diag}\Big(Q^\top
        \Big(\sum_n \sum_k g_{n,k} g_{n,k}^\top\Big) Q\Big),
    \qquad Q = Q_G \otimes Q_A ,
$$

of the summed torch loss (``CrossEntropyLoss(reduction="sum")`` or
``MSELoss(reduction="sum")``), with ``g_{n,k}`` the per-example (pseudo-)gradients.
laplace-torch's curvature is that of the negative log likelihood: cross-entropy
itself, and for regression ``½·MSE-sum`` (a Gaussian with unit variance; σ and the
temperature enter later through ``1/(σ² T)``). :func:`likelihood_loss` gives the loss
and the factor between the two scales; :meth:`EKFACFactors.scaled` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from laplace.utils.enums import Likelihood
from torch import Tensor, nn

from ekfac_laplace.fitted import FittedLayout
from ekfac_laplace.matrix import EKFACDecomposed
from ekfac_laplace.sketch import corrected_matrix

#: The likelihoods whose curvature EKFAC computes (laplace-torch's enum; reward
#: modelling is fitted as classification over pairs).
LIKELIHOODS = (Likelihood.CLASSIFICATION, Likelihood.REGRESSION)


def curvature_likelihood(likelihood: Likelihood | str) -> Likelihood:
    """The likelihood of a curvature, as laplace-torch's enum.

    Args:
        likelihood: ``"classification"`` or ``"regression"`` (or the enum).

    Returns:
        The enum member.

    Raises:
        ValueError: For another likelihood.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"EKFAC supports the likelihoods 'classification' and 'regression', got "
            f"{likelihood!r}."
        )
    return Likelihood(likelihood)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the curvature of a model of ``dtype`` is accumulated.

    float16 / bfloat16 models: float32 (their 8–11-bit mantissas would lose the
    sums of squares, and ``eigh`` does not take them); otherwise the model's own.

    Args:
        dtype: The model's parameter dtype.

    Returns:
        float32 for half precision, else ``dtype``.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def likelihood_loss(likelihood: Likelihood | str) -> tuple[nn.Module, float]:
    """laplace-torch's summed loss of a likelihood and its factor to the NLL.

    Args:
        likelihood: ``"classification"`` or ``"regression"``.

    Returns:
        The summed torch loss and the factor converting it to a negative log
        likelihood (``1`` and ``½``).

    Raises:
        ValueError: For another likelihood.
    """
    if curvature_likelihood(likelihood) == Likelihood.CLASSIFICATION:
        return nn.CrossEntropyLoss(reduction="sum"), 1.0
    return nn.MSELoss(reduction="sum"), 0.5


@dataclass
class EKFACFactors:
    """EKFAC of a data set: eigenbases, corrected eigenvalues and the data term.

    Attributes:
        eigenvectors: Per parameter tensor, ``(Q_G, Q_A)`` (weight), ``(Q_G,)``
            (bias) or ``()`` (diagonal block: the identity basis).
        eigenvalues: Per parameter tensor, the corrected eigenvalues summed over the
            data set: shape ``(out, in)`` for a weight, ``(out,)`` for a bias, the
            parameter's shape for a diagonal block.
        loss: The data term: ``Σ_n loss(f(x_n), y_n)``, in the same scale as the
            eigenvalues (laplace-torch stores it as ``Laplace.loss``).
        tokens: For token-level outputs ``(B, T, C)``, the number of counted
            tokens (the examples ``N``); ``None`` otherwise.
        dense: Online fitting only: block index to this data's exact block
            ``(n, n)``, to add to the previous fit's (its entries in
            ``eigenvalues`` are zeros in the previous basis).
        batch_dims: Module name to the dimension of its tensors that holds the
            batch, where it is not 0, as the fit found it; ``None`` where the fit
            did not look (one example per batch, the curvlinops engine).
        layout: The fitted layout, every block's structure, kind and shapes
            (set by :func:`~ekfac_laplace.compute_ekfac`; ``None`` from an engine
            alone).
        corrections: With a ``correction_rank``: block index to the top-``k``
            eigenpairs ``(U, S)`` of its rotated curvature, in the scale of the
            eigenvalues (:mod:`ekfac_laplace.sketch`); its ``eigenvalues`` stay
            ``diag(R)``.
    """

    eigenvectors: list[tuple[Tensor, ...]]
    eigenvalues: list[Tensor]
    loss: Tensor
    tokens: int | None = None
    dense: dict[int, Tensor] = field(default_factory=dict)
    batch_dims: dict[str, int] | None = None
    layout: FittedLayout | None = None
    corrections: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def scaled(self, factor: float) -> EKFACFactors:
        """The factors in another scale, eigenvalues clamped at zero.

        Args:
            factor: Multiplies the eigenvalues and the loss (e.g. ``½`` from the
                summed MSE to the Gaussian NLL).

        Returns:
            New factors sharing the eigenbases.
        """
        return EKFACFactors(
            self.eigenvectors,
            [values.mul(factor).clamp_min(0.0) for values in self.eigenvalues],
            factor * self.loss,
            self.tokens,
            {index: block * factor for index, block in self.dense.items()},
            self.batch_dims,
            self.layout,
            {index: (U, S * factor) for index, (U, S) in self.corrections.items()},
        )

    def to_decomposed(self) -> EKFACDecomposed:
        """The curvature as an :class:`EKFACDecomposed` with zero deltas.

        Corrected blocks get ``D + U S Uᵀ``
        (:func:`~ekfac_laplace.sketch.corrected_matrix`).

        Returns:
            The structured matrix.
        """
        if self.corrections:
            return corrected_matrix(
                self.eigenvectors, self.eigenvalues, self.corrections
            )
        return EKFACDecomposed(self.eigenvectors, self.eigenvalues)

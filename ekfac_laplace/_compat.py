"""The only place that touches private attributes of curvlinops or laplace-torch.

curvlinops' ``EKFACLinearOperator`` exposes its Kronecker eigenbasis and corrected
eigenvalues through the public ``state_dict()``, and its two passes through the
public ``compute_kronecker_factors()`` / ``compute_eigenvalue_correction()``. What it
does not expose is a way to *set* the eigenbasis before the correction pass, which
online (continual) fitting needs: the new data's corrected eigenvalues must be
computed in the basis of the first fit. That single write lives here, guarded so
that a curvlinops release which renames the attributes fails loudly.
"""

from __future__ import annotations

from curvlinops import EKFACLinearOperator
from torch import Tensor

_EIGENVECTOR_ATTRIBUTES = (
    "_input_covariances_eigenvectors",
    "_gradient_covariances_eigenvectors",
)


def set_kronecker_eigenbasis(
    operator: EKFACLinearOperator,
    input_eigenvectors: dict[str, Tensor],
    gradient_eigenvectors: dict[str, Tensor],
) -> None:
    """Fix the Kronecker eigenbasis of an EKFAC operator before its correction pass.

    ``EKFACLinearOperator.compute_eigenvalue_correction`` computes the eigenbasis
    from the Kronecker factors only when none is cached; caching ours makes it
    compute the corrected eigenvalues of its data in *our* basis.

    Args:
        operator: A freshly constructed curvlinops EKFAC operator.
        input_eigenvectors: Module name to ``Q_A`` (weights only).
        gradient_eigenvectors: Module name to ``Q_G``.

    Raises:
        RuntimeError: If the installed curvlinops lacks the expected attributes.
    """
    for name in _EIGENVECTOR_ATTRIBUTES:
        if not isinstance(getattr(operator, name, None), dict):
            raise RuntimeError(
                f"The installed curvlinops has no EKFACLinearOperator.{name}; "
                "ekfac_laplace supports curvlinops-for-pytorch 3.0.x. Install a "
                "supported version: pip install 'curvlinops-for-pytorch>=3.0.1,<3.1'."
            )
    operator._input_covariances_eigenvectors = dict(input_eigenvectors)
    operator._gradient_covariances_eigenvectors = dict(gradient_eigenvectors)

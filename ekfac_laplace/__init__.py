"""EKFAC Laplace approximations for PyTorch networks, inside laplace-torch.

Importing the package registers ``hessian_structure="ekfac"`` with
``laplace.Laplace``::

    import ekfac_laplace  # noqa: F401
    from laplace import Laplace

    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="ekfac")
"""

import warnings

with warnings.catch_warnings():
    # laplace-torch imports asdl, which calls the deprecated torch.jit.script when
    # imported; the notice is not actionable for our users.
    warnings.filterwarnings(
        "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
    )
    from ekfac_laplace.calibration import evaluate, predict
    from ekfac_laplace.curvature import EKFACFactors, compute_ekfac
    from ekfac_laplace.laplace import EKFACLaplace, EKFACLLLaplace
    from ekfac_laplace.matrix import EKFACDecomposed
    from ekfac_laplace.selection import Candidate, Comparison, compare, select

__version__ = "0.1.0"

__all__ = [
    # Laplace approximations (registered with laplace.Laplace)
    "EKFACLaplace",
    "EKFACLLLaplace",
    # Structured matrix
    "EKFACDecomposed",
    # Curvature
    "EKFACFactors",
    "compute_ekfac",
    # Evaluation and selection
    "evaluate",
    "predict",
    "compare",
    "select",
    "Candidate",
    "Comparison",
]

"""EKFAC Laplace approximations for PyTorch networks, inside laplace-torch.

Importing the package registers ``hessian_structure="ekfac"`` with
``laplace.Laplace``::

    import ekfac_laplace  # noqa: F401
    from laplace import Laplace

    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="ekfac")

The core (this package's modules) imports nothing from the evaluation side,
:mod:`ekfac_laplace.evaluation` (metrics, comparison, data, plots, command line),
which loads when it is first used; its main functions are also reachable from here
(``ekfac_laplace.evaluate``, ``ekfac_laplace.compare``,
``ekfac_laplace.EvaluationSettings``, ...).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# laplace-torch imports asdl, and torch's forward-mode AD loads decompositions, both
# calling the deprecated torch.jit.script: a notice our users cannot act on. This one
# message is hidden from here on; every other warning is left as it is.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

from ekfac_laplace.curvature import compute_ekfac  # noqa: E402
from ekfac_laplace.factors import EKFACFactors  # noqa: E402
from ekfac_laplace.laplace import EKFACLaplace, EKFACLLLaplace  # noqa: E402
from ekfac_laplace.matrix import EKFACDecomposed  # noqa: E402
from ekfac_laplace.options import (  # noqa: E402
    EKFACOptions,
    Engine,
    FisherType,
    KFACApprox,
    UnsupportedLayers,
)
from ekfac_laplace.posterior import EKFACPosterior  # noqa: E402

__version__ = "0.2.0"

#: Names of the evaluation side re-exported here, loaded on first use.
_EVALUATION_EXPORTS = (
    "evaluate",
    "predict",
    "compare",
    "select",
    "select_structures",
    "Candidate",
    "Comparison",
    "EvaluationSettings",
)

__all__ = [
    # Laplace approximations (registered with laplace.Laplace)
    "EKFACLaplace",
    "EKFACLLLaplace",
    "EKFACPosterior",
    # Options
    "EKFACOptions",
    "FisherType",
    "KFACApprox",
    "Engine",
    "UnsupportedLayers",
    # Structured matrix and curvature
    "EKFACDecomposed",
    "EKFACFactors",
    "compute_ekfac",
    # Evaluation and selection (lazy)
    *_EVALUATION_EXPORTS,
]


def __getattr__(name: str) -> Any:
    """Load the evaluation side on first use of one of its names."""
    if name in _EVALUATION_EXPORTS:
        evaluation = importlib.import_module("ekfac_laplace.evaluation")
        return getattr(evaluation, name)
    raise AttributeError(f"module 'ekfac_laplace' has no attribute {name!r}")

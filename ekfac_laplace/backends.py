"""laplace-torch's curvature backends, and the EKFAC options a Laplace object gets.

laplace-torch chooses the curvature by the backend class: ``CurvlinopsGGN`` is the
exact GGN (or, with ``backend_kwargs={"stochastic": True}``, the Monte-Carlo Fisher),
``CurvlinopsEF`` the empirical Fisher. EKFAC itself is always computed by our engines;
the backend only says which curvature, and stays the object laplace-torch uses where
it needs a backend (the dense-Jacobian predictive with ``enable_backprop=True``).
:func:`laplace_options` turns a Laplace constructor's arguments into one validated
:class:`~ekfac_laplace.EKFACOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from laplace.curvature import CurvatureInterface, CurvlinopsEF, CurvlinopsGGN

from ekfac_laplace.options import (
    DEFAULT_CACHE_BUDGET_BYTES,
    DEFAULT_SEED,
    EKFACOptions,
    FisherType,
)

#: ``asdl_fisher_kwargs`` keys that KronLaplace users pass and EKFAC understands.
ASDL_FISHER_KEYS = ("kfac_approx", "mc_samples")


def fisher_type_of(
    backend: type[CurvatureInterface] | None, backend_kwargs: Mapping[str, Any]
) -> FisherType:
    """The curvature a laplace-torch backend stands for.

    Args:
        backend: A backend class; ``None`` is laplace-torch's default for EKFAC,
            ``CurvlinopsGGN``.
        backend_kwargs: The backend's keyword arguments (``stochastic``).

    Returns:
        The Fisher type.

    Raises:
        ValueError: For a backend EKFAC does not support.
    """
    backend = CurvlinopsGGN if backend is None else backend
    if isinstance(backend, type) and issubclass(backend, CurvlinopsEF):
        return FisherType.EMPIRICAL
    if isinstance(backend, type) and issubclass(backend, CurvlinopsGGN):
        stochastic = backend_kwargs.get("stochastic", False)
        return FisherType.MC if stochastic else FisherType.TYPE2
    name = getattr(backend, "__name__", repr(backend))
    raise ValueError(
        f"EKFAC Laplace does not support the backend {name}; use "
        "laplace.curvature.CurvlinopsGGN (exact GGN, or Monte-Carlo Fisher with "
        "backend_kwargs={'stochastic': True}) or laplace.curvature.CurvlinopsEF "
        "(empirical Fisher)."
    )


def laplace_options(
    backend: type[CurvatureInterface] | None = None,
    backend_kwargs: Mapping[str, Any] | None = None,
    asdl_fisher_kwargs: Mapping[str, Any] | None = None,
    *,
    kfac_approx: str = "expand",
    mc_samples: int = 1,
    seed: int = DEFAULT_SEED,
    engine: str = "fast",
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
    unsupported_layers: str = "diagonal",
) -> EKFACOptions:
    """The EKFAC options of a Laplace constructor's arguments, validated.

    ``asdl_fisher_kwargs`` may carry ``kfac_approx`` and ``mc_samples``, as
    KronLaplace users pass them; they take precedence over the keywords.

    Args:
        backend: laplace-torch backend class (decides the Fisher type).
        backend_kwargs: The backend's keyword arguments.
        asdl_fisher_kwargs: KronLaplace-style ``kfac_approx`` / ``mc_samples``.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        mc_samples: Labels per example for the Monte-Carlo Fisher.
        seed: Seed of the Monte-Carlo label sampler.
        engine: ``"fast"`` or ``"curvlinops"``.
        cache_budget_bytes: Memory the fast engine may use to skip its second pass.
        unsupported_layers: ``"diagonal"`` or ``"raise"``.

    Returns:
        The options.

    Raises:
        ValueError: For an unsupported backend, unknown ``asdl_fisher_kwargs`` keys
            or an invalid option.
    """
    extra = dict(asdl_fisher_kwargs or {})
    unknown = set(extra) - set(ASDL_FISHER_KEYS)
    if unknown:
        raise ValueError(
            f"asdl_fisher_kwargs keys {sorted(unknown)} are not used by EKFAC; only "
            f"{' and '.join(repr(key) for key in ASDL_FISHER_KEYS)} are."
        )
    return EKFACOptions(
        fisher_type=fisher_type_of(backend, backend_kwargs or {}),
        kfac_approx=extra.get("kfac_approx", kfac_approx),
        mc_samples=extra.get("mc_samples", mc_samples),
        seed=seed,
        engine=engine,
        cache_budget_bytes=cache_budget_bytes,
        unsupported_layers=unsupported_layers,
    )

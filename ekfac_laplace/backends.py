"""laplace-torch's curvature backends, and the EKFAC options a Laplace object gets.

laplace-torch chooses the curvature by the backend class. Every GGN backend
(``CurvlinopsGGN``, ``AsdlGGN``, ``BackPackGGN``) stands for the exact GGN, or, with
``backend_kwargs={"stochastic": True}``, for the Monte-Carlo Fisher; every EF backend
(``CurvlinopsEF``, ``AsdlEF``, ``BackPackEF``) for the empirical Fisher. EKFAC itself
is always computed by our engines; the backend only says which curvature, and stays
the object laplace-torch uses where it needs a backend (the dense-Jacobian predictive
with ``enable_backprop=True``). Hessian backends (``CurvlinopsHessian``,
``AsdlHessian``) are refused: the Hessian has no Kronecker-factored eigenbasis of
positive semi-definite factors. :func:`laplace_options` turns a Laplace constructor's
arguments into one validated :class:`~ekfac_laplace.EKFACOptions`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from laplace.curvature import (
    CurvatureInterface,
    CurvlinopsGGN,
    EFInterface,
    GGNInterface,
)

from ekfac_laplace.options import EKFACOptions, FisherType, option_keywords

#: ``asdl_fisher_kwargs`` keys that KronLaplace users pass, and the EKFAC option each
#: sets. ``mc_samples`` / ``kfac_approx`` / ``seed`` are curvlinops' KFAC arguments;
#: ``n_mc_samples`` is ASDL's name for the number of Monte-Carlo samples.
ASDL_FISHER_KEYS = {
    "mc_samples": "mc_samples",
    "kfac_approx": "kfac_approx",
    "seed": "seed",
    "n_mc_samples": "mc_samples",
}
#: Arguments laplace-torch passes to every backend itself.
_SET_BY_LAPLACE = frozenset(
    (
        "self",
        "model",
        "likelihood",
        "last_layer",
        "subnetwork_indices",
        "dict_key_x",
        "dict_key_y",
    )
)
_GGN_BACKENDS = "CurvlinopsGGN, AsdlGGN or BackPackGGN"
_EF_BACKENDS = "CurvlinopsEF, AsdlEF or BackPackEF"


def _name(backend: object) -> str:
    return getattr(backend, "__name__", repr(backend))


def check_backend_kwargs(
    backend: type[CurvatureInterface], backend_kwargs: Mapping[str, Any]
) -> None:
    """Refuse ``backend_kwargs`` the backend's constructor would not take.

    laplace-torch creates the backend lazily, so a bad key would otherwise surface
    as a ``TypeError`` at the first use of the backend, after the fit.

    Args:
        backend: A backend class.
        backend_kwargs: Its keyword arguments.

    Raises:
        ValueError: For a key the constructor does not take, one laplace-torch sets
            itself, or a non-boolean ``stochastic``.
    """
    parameters = inspect.signature(backend.__init__).parameters
    accepted = sorted(set(parameters) - _SET_BY_LAPLACE)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for key in backend_kwargs:
        if key in _SET_BY_LAPLACE or not (key in parameters or takes_any):
            raise ValueError(
                f"backend_kwargs key {key!r} is not an argument of {_name(backend)}; "
                f"it takes {accepted or 'none'} (model, likelihood, last_layer and "
                "the dict keys are set by laplace-torch)."
            )
    stochastic = backend_kwargs.get("stochastic", False)
    if not isinstance(stochastic, bool):
        raise ValueError(
            f"backend_kwargs['stochastic'] must be True or False, got {stochastic!r}."
        )


def fisher_type_of(
    backend: type[CurvatureInterface] | None, backend_kwargs: Mapping[str, Any]
) -> FisherType:
    """The curvature a laplace-torch backend stands for.

    Args:
        backend: A backend class; ``None`` is laplace-torch's default,
            ``CurvlinopsGGN``.
        backend_kwargs: The backend's keyword arguments (``stochastic``).

    Returns:
        ``TYPE2`` (exact GGN) or ``MC`` (``stochastic=True``) for a GGN backend,
        ``EMPIRICAL`` for an EF backend.

    Raises:
        ValueError: For a Hessian backend, anything that is not a laplace-torch
            backend class, or ``backend_kwargs`` it does not take.
    """
    backend = CurvlinopsGGN if backend is None else backend
    if not (isinstance(backend, type) and issubclass(backend, CurvatureInterface)):
        raise ValueError(
            f"backend must be a laplace.curvature backend class, got {backend!r}; "
            f"use a GGN backend ({_GGN_BACKENDS}) or an EF backend ({_EF_BACKENDS})."
        )
    if not issubclass(backend, (GGNInterface, EFInterface)):
        raise ValueError(
            f"EKFAC Laplace does not support the backend {_name(backend)}: EKFAC "
            "approximates a GGN or Fisher, whose Kronecker factors are positive "
            "semi-definite; the Hessian has no such eigenbasis. Use a GGN backend "
            f"({_GGN_BACKENDS}; backend_kwargs={{'stochastic': True}} for the "
            f"Monte-Carlo Fisher) or an EF backend ({_EF_BACKENDS})."
        )
    check_backend_kwargs(backend, backend_kwargs)
    if issubclass(backend, EFInterface):
        return FisherType.EMPIRICAL
    stochastic = backend_kwargs.get("stochastic", False)
    return FisherType.MC if stochastic else FisherType.TYPE2


def laplace_options(
    backend: type[CurvatureInterface] | None = None,
    backend_kwargs: Mapping[str, Any] | None = None,
    asdl_fisher_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> EKFACOptions:
    """The EKFAC options of a Laplace constructor's arguments, validated.

    ``asdl_fisher_kwargs`` may carry what KronLaplace users pass there
    (:data:`ASDL_FISHER_KEYS`); it takes precedence over the keywords.

    Args:
        backend: laplace-torch backend class (decides the Fisher type).
        backend_kwargs: The backend's keyword arguments.
        asdl_fisher_kwargs: KronLaplace-style ``mc_samples`` / ``n_mc_samples``,
            ``kfac_approx`` and ``seed``.
        **options: The keyword options of :class:`~ekfac_laplace.EKFACOptions`
            (:func:`~ekfac_laplace.options.option_keywords`).

    Returns:
        The options.

    Raises:
        ValueError: For an unsupported backend, unknown ``asdl_fisher_kwargs`` keys
            or an invalid option.
        TypeError: For an unknown option.
    """
    unknown = set(options) - set(option_keywords())
    if unknown:
        raise TypeError(
            f"Unknown EKFAC options {sorted(unknown)}; the options are "
            f"{', '.join(option_keywords())}."
        )
    extra = dict(asdl_fisher_kwargs or {})
    unknown = set(extra) - set(ASDL_FISHER_KEYS)
    if unknown:
        raise ValueError(
            f"asdl_fisher_kwargs keys {sorted(unknown)} are not used by EKFAC; it "
            f"understands {sorted(ASDL_FISHER_KEYS)}."
        )
    if "mc_samples" in extra and "n_mc_samples" in extra:
        raise ValueError(
            "asdl_fisher_kwargs has both 'mc_samples' and 'n_mc_samples'; give one."
        )
    given = dict(options)
    for key, value in extra.items():
        given[ASDL_FISHER_KEYS[key]] = value
    return EKFACOptions(
        fisher_type=fisher_type_of(backend, backend_kwargs or {}), **given
    )

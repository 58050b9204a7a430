"""Running a predictor over a loader: a Laplace object's predictive, or the MAP's.

:func:`predict` runs a fitted laplace-torch ``Laplace`` object (laplace-torch's own
or ours) or a plain MAP network over a data loader and collects its predictive:
class probabilities, or a Gaussian mean and variance of ``y`` (observation noise
included). :func:`evaluate` adds the metrics of :mod:`ekfac_laplace.evaluation.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch
from laplace.baselaplace import BaseLaplace
from torch import Tensor, nn

from ekfac_laplace.batches import module_device, split_batch, to_device
from ekfac_laplace.distributed import ranks_of
from ekfac_laplace.evaluation.checks import (
    check_choice,
    check_n_bins,
    check_probs,
    check_regression,
)
from ekfac_laplace.evaluation.metrics import (
    ClassificationPredictions,
    Predictions,
    RegressionPredictions,
    metrics_of,
)
from ekfac_laplace.evaluation.peers import Predictive
from ekfac_laplace.factors import LIKELIHOODS

PRED_TYPES = ("glm", "nn")
#: The likelihoods that can be evaluated, by name.
LIKELIHOOD_NAMES = tuple(member.value for member in LIKELIHOODS)
LINK_APPROXES = ("probit", "mc", "bridge", "bridge_norm")


def _resolve_likelihood(predictor: object, likelihood: str | None) -> str:
    if isinstance(predictor, BaseLaplace):
        own = str(getattr(predictor.likelihood, "value", predictor.likelihood))
        if own not in LIKELIHOOD_NAMES:
            raise ValueError(
                f"Only Laplace objects with likelihood in {LIKELIHOOD_NAMES} can be "
                f"evaluated, got {own!r}."
            )
        if likelihood is not None and likelihood != own:
            raise ValueError(
                f"likelihood={likelihood!r} disagrees with the Laplace object's "
                f"likelihood {own!r}; leave likelihood=None."
            )
        return own
    if isinstance(predictor, Predictive):
        if likelihood is not None and likelihood != predictor.likelihood:
            raise ValueError(
                f"likelihood={likelihood!r} disagrees with the predictive's "
                f"likelihood {predictor.likelihood!r}; leave likelihood=None."
            )
        return predictor.likelihood
    if isinstance(predictor, nn.Module):
        if likelihood is None:
            raise ValueError(
                "A plain nn.Module needs likelihood='classification' or "
                "'regression' (a Laplace object carries its own)."
            )
        check_choice("likelihood", likelihood, LIKELIHOOD_NAMES)
        return likelihood
    raise TypeError(
        "predictor must be a fitted laplace-torch Laplace object, an nn.Module or "
        f"an evaluation.peers.Predictive, got {type(predictor).__name__}."
    )


def _check_sigma_noise(
    predictor: object, likelihood: str, sigma_noise: float | None
) -> None:
    """A Laplace object has its own σ; a MAP regressor needs one; classifiers none."""
    if isinstance(predictor, BaseLaplace | Predictive):
        if sigma_noise is not None:
            owner = "Laplace object (la.sigma_noise)"
            if isinstance(predictor, Predictive):
                owner = f"{type(predictor).__name__} predictive"
            raise ValueError(
                f"sigma_noise is read from the {owner}; leave sigma_noise=None, got "
                f"{sigma_noise!r}."
            )
        return
    if likelihood == "classification":
        return  # σ plays no role in a classifier's predictive: ignored
    if (
        isinstance(sigma_noise, bool)
        or not isinstance(sigma_noise, Real)
        or not 0 < sigma_noise < math.inf
    ):
        raise ValueError(
            "A plain nn.Module regressor needs the observation noise: pass "
            f"sigma_noise as a float > 0, got {sigma_noise!r}."
        )


def _laplace_forward(
    la: BaseLaplace,
    likelihood: str,
    pred_type: str,
    link_approx: str,
    n_samples: int,
) -> Callable[[Any], Tensor | tuple[Tensor, Tensor]]:
    # laplace-torch's "nn" predictive always averages Monte-Carlo samples.
    link = "mc" if pred_type == "nn" else link_approx

    def forward(x: Any) -> Tensor | tuple[Tensor, Tensor]:
        out = la(x, pred_type=pred_type, link_approx=link, n_samples=n_samples)
        if likelihood == "classification":
            return out
        f_mu, f_var = out
        if f_var.ndim == 3:  # GLM: (B, K, K) output covariance
            f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
        sigma_noise = torch.as_tensor(la.sigma_noise).detach().to(f_var)
        return f_mu, f_var + sigma_noise.square()

    return forward


def _module_forward(
    model: nn.Module, likelihood: str, sigma_noise: float | None
) -> Callable[[Any], Tensor | tuple[Tensor, Tensor]]:
    def forward(x: Any) -> Tensor | tuple[Tensor, Tensor]:
        out = model(x)
        if likelihood == "classification":
            return torch.softmax(out, dim=-1)
        return out, torch.full_like(out, float(sigma_noise) ** 2)

    return forward


def predict(
    predictor: BaseLaplace | nn.Module | Predictive,
    loader: Iterable[Any],
    *,
    likelihood: str | None = None,
    pred_type: str = "glm",
    link_approx: str = "probit",
    n_samples: int = 100,
    sigma_noise: float | None = None,
    process_group: Any | None = None,
) -> Predictions:
    """Collect the predictive of a Laplace object or a MAP network over a loader.

    A fitted laplace-torch ``Laplace`` object (laplace-torch's or
    :class:`~ekfac_laplace.EKFACLaplace` / :class:`~ekfac_laplace.EKFACLLLaplace`)
    is called as ``la(x, pred_type, link_approx, n_samples)``; for regression the
    predictive variance is the diagonal of the functional (co)variance plus
    ``la.sigma_noise²``. A plain ``nn.Module`` is the MAP predictive (in its current
    train/eval mode): softmax of its outputs, or its outputs with variance
    ``sigma_noise²``. Inputs are moved to the device of the model's parameters;
    results are returned on the CPU.

    Args:
        predictor: A fitted Laplace object, a plain network or a peer predictive.
        loader: Batches ``(x, y)``, or dicts (Hugging Face style) passed whole to
            the model as laplace-torch does, with targets under ``la.dict_key_y``
            (``"labels"`` for a plain network).
        likelihood: ``"classification"`` or ``"regression"``; required for a plain
            network, read from a Laplace object.
        pred_type: ``"glm"`` or ``"nn"``; ignored for a plain network.
        link_approx: ``"probit"``, ``"mc"``, ``"bridge"`` or ``"bridge_norm"`` for
            GLM classification; ``pred_type="nn"`` always uses ``"mc"``.
        n_samples: Monte-Carlo samples (``"mc"`` link or ``"nn"`` predictive).
        sigma_noise: Observation noise of a plain network regressor (float > 0);
            ignored for classification, and must be ``None`` for a Laplace object.
        process_group: A ``torch.distributed`` process group whose ranks each pass
            a shard of the set: the predictions of every rank are gathered, in rank
            order, on every rank (the metrics then are those of the whole set).
            ``None``: one process.

    Returns:
        Probabilities ``(N, C)`` and labels ``(N,)`` (not range-checked, so an OOD
        set may carry any labels), or mean, variance and targets
        ``(N, K)`` (targets of shape ``(N,)`` become ``(N, 1)``).

    Raises:
        ValueError: For an unknown option, a missing likelihood or sigma_noise, an
            empty loader, bad batches or predictions of the wrong shape.
        TypeError: If ``predictor`` is neither a Laplace object nor a network.
    """
    check_choice("pred_type", pred_type, PRED_TYPES)
    check_choice("link_approx", link_approx, LINK_APPROXES)
    likelihood = _resolve_likelihood(predictor, likelihood)
    _check_sigma_noise(predictor, likelihood, sigma_noise)
    min_samples = 2 if (pred_type, likelihood) == ("nn", "regression") else 1
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise ValueError(f"n_samples must be an integer, got {n_samples!r}.")
    if isinstance(predictor, BaseLaplace) and n_samples < min_samples:
        raise ValueError(
            f"n_samples must be >= {min_samples} for pred_type={pred_type!r} and "
            f"{likelihood}, got {n_samples}."
        )
    if isinstance(predictor, BaseLaplace):
        key_y, key_x = predictor.dict_key_y, predictor.dict_key_x
        forward = _laplace_forward(
            predictor, likelihood, pred_type, link_approx, n_samples
        )
        device = module_device(predictor.model)
    elif isinstance(predictor, Predictive):
        key_y, key_x, forward = "labels", None, predictor
        device = predictor.device
    else:
        key_y, key_x = "labels", None
        forward = _module_forward(predictor, likelihood, sigma_noise)
        device = module_device(predictor)

    def collect() -> list[tuple[Tensor, ...]]:
        outputs = []
        with torch.no_grad():
            for batch in loader:
                x, y = split_batch(batch, key_y, key_x)
                out = forward(to_device(x, device))
                out = (out,) if isinstance(out, Tensor) else tuple(out)
                outputs.append(
                    tuple(o.detach().cpu() for o in out) + (y.detach().cpu(),)
                )
        return outputs

    ranks = ranks_of(process_group)
    outputs = ranks.run(collect, "the predictions")
    outputs = ranks.gather(outputs)  # every rank's shard, in rank order
    if not outputs:
        raise ValueError("The loader yielded no batches; pass a non-empty loader.")

    if likelihood == "classification":
        # Labels are checked by the metrics, not here: those of an OOD set may lie
        # outside the model's classes.
        probs = check_probs(torch.cat([_batch_probs(p, y) for p, y in outputs]))
        targets = torch.cat([y.reshape(-1) for _, y in outputs])
        return ClassificationPredictions(probs=probs, targets=targets)
    means, variances, targets = zip(*(_batch_regression(*o) for o in outputs))
    mean, variance, target = check_regression(
        mean=torch.cat(means), variance=torch.cat(variances), targets=torch.cat(targets)
    )
    return RegressionPredictions(mean=mean, variance=variance, targets=target)


def _batch_probs(probs: Tensor, targets: Tensor) -> Tensor:
    if probs.ndim != 2 or targets.numel() != probs.shape[0]:
        raise ValueError(
            f"Predicted probabilities of shape {tuple(probs.shape)} do not match "
            f"targets of shape {tuple(targets.shape)}; expected (B, C) and (B,)."
        )
    return probs


def _batch_regression(
    mean: Tensor, variance: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    batch = targets.shape[0] if targets.ndim else 0
    mean, variance = mean.reshape(batch, -1), variance.reshape(batch, -1)
    targets = targets.reshape(batch, -1).to(mean.dtype)
    if targets.shape != mean.shape:
        raise ValueError(
            f"Predictive mean of shape {tuple(mean.shape)} does not match targets "
            f"of shape {tuple(targets.shape)}; expected (B, K) for both."
        )
    return mean, variance, targets


def evaluate(
    predictor: BaseLaplace | nn.Module | Predictive,
    loader: Iterable[Any],
    *,
    likelihood: str | None = None,
    pred_type: str = "glm",
    link_approx: str = "probit",
    n_samples: int = 100,
    ood_loader: Iterable[Any] | None = None,
    n_bins: int = 15,
    sigma_noise: float | None = None,
    process_group: Any | None = None,
) -> dict[str, float]:
    """Predict over a loader and compute the metrics of :func:`predict`'s result.

    Args:
        predictor: A fitted Laplace object or a plain network.
        loader: In-distribution test batches (see :func:`predict`).
        likelihood: Required for a plain network.
        pred_type: ``"glm"`` or ``"nn"``.
        link_approx: Link approximation for GLM classification.
        n_samples: Monte-Carlo samples.
        ood_loader: Out-of-distribution batches (classification only).
        n_bins: Number of bins of the calibration errors.
        sigma_noise: Observation noise of a plain network regressor.
        process_group: A ``torch.distributed`` process group whose ranks each pass
            a shard of the test set (and of ``ood_loader``): every rank gets the
            metrics of the whole set (see :func:`predict`).

    Returns:
        :func:`~ekfac_laplace.evaluation.metrics.classification_metrics` (with OOD
        keys when ``ood_loader`` is given) or
        :func:`~ekfac_laplace.evaluation.metrics.regression_metrics`.

    Raises:
        ValueError: As :func:`predict`, and for ``ood_loader`` with regression.
    """
    resolved = _resolve_likelihood(predictor, likelihood)
    if ood_loader is not None and resolved == "regression":
        raise ValueError(
            "ood_loader is only supported for classification; drop it for regression."
        )
    check_n_bins(n_bins)
    options = {
        "likelihood": likelihood,
        "pred_type": pred_type,
        "link_approx": link_approx,
        "n_samples": n_samples,
        "sigma_noise": sigma_noise,
        "process_group": process_group,
    }
    predictions = predict(predictor, loader, **options)
    ood = None if ood_loader is None else predict(predictor, ood_loader, **options)
    return metrics_of(predictions, ood, n_bins=n_bins)

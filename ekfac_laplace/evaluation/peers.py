"""The peers of a Laplace approximation: calibrated predictives without a posterior.

A practitioner who wants better-calibrated probabilities from a trained network tries
these first; a comparison that leaves them out flatters Laplace.

- :class:`TemperatureScaled` (Guo et al., 2017): the MAP with its logits divided by
  one scalar ``T`` fitted on the validation set (for regression, its noise scale
  refitted on the validation set);
- :class:`DeepEnsemble` (Lakshminarayanan et al., 2017): the average predictive of
  ``M`` networks trained from different seeds;
- :class:`MCDropout` (Gal and Ghahramani, 2016): the average predictive of a network
  trained with dropout, over random dropout masks at test time.

Each is a :class:`Predictive`: called on a batch of inputs it returns class
probabilities ``(B, C)``, or a Gaussian mean and variance of ``y`` ``(B, K)`` each,
and :func:`~ekfac_laplace.evaluation.predict` evaluates it like a Laplace object.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_laplace.batches import module_device, split_batch, to_device

#: Trains one peer network: ``train_peer(seed, dropout)`` returns a network trained
#: from the initialisation and data order of ``seed``, with dropout rate ``dropout``
#: (0: none) before each hidden layer, in eval mode.
PeerTrainer = Callable[[int, float], nn.Module]


class Predictive(ABC):
    """A predictive that is not a Laplace approximation, evaluated like one.

    Attributes:
        likelihood: ``"classification"`` or ``"regression"``.
    """

    likelihood: str

    @abstractmethod
    def __call__(self, x: Any) -> Tensor | tuple[Tensor, Tensor]:
        """The predictive of a batch.

        Args:
            x: A batch of inputs, on :attr:`device`.

        Returns:
            Class probabilities ``(B, C)``, or the mean and variance of ``y``,
            ``(B, K)`` each.
        """

    @property
    @abstractmethod
    def networks(self) -> list[nn.Module]:
        """The networks behind the predictive."""

    @property
    def device(self) -> torch.device:
        """Where the inputs go: the device of the first network's parameters."""
        return module_device(self.networks[0])


class TemperatureScaled(Predictive):
    """The MAP with one fitted temperature: ``p(y | x) = softmax(f(x) / T)``.

    ``T`` minimises the validation NLL (Guo et al., 2017, "On calibration of modern
    neural networks"); it changes the confidence but never the predicted class. For
    regression the analogue is the noise scale: ``y ~ N(f(x), σ_val²)`` with
    ``σ_val² = mean((y − f(x))²)`` over the validation set, its maximum-likelihood
    value; :attr:`temperature` is then ``σ_val / σ`` for the MAP's ``σ``.

    Attributes:
        model: The MAP network.
        likelihood: ``"classification"`` or ``"regression"``.
        temperature: ``T`` (classification), or ``σ_val / σ`` (regression).
        sigma_noise: The refitted ``σ_val`` (regression), else ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        temperature: float,
        sigma_noise: float | None = None,
    ) -> None:
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be positive, got {temperature!r}.")
        if likelihood == "regression" and not (
            sigma_noise is not None and 0 < sigma_noise < math.inf
        ):
            raise ValueError(
                f"A regression temperature needs sigma_noise > 0, got {sigma_noise!r}."
            )
        self.model, self.likelihood = model, likelihood
        self.temperature, self.sigma_noise = float(temperature), sigma_noise

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        val_loader: Iterable[Any],
        likelihood: str,
        *,
        sigma_noise: float | None = None,
    ) -> TemperatureScaled:
        """Fit the temperature on validation data.

        Classification minimises the mean NLL over ``log T`` with L-BFGS in float64
        (the NLL is convex in ``1/T``, so its minimum is unique); regression sets
        ``σ_val`` in closed form.

        Args:
            model: The MAP network (left unchanged).
            val_loader: Validation batches ``(x, y)``.
            likelihood: ``"classification"`` or ``"regression"``.
            sigma_noise: The MAP's noise scale ``σ`` (regression only).

        Returns:
            The temperature-scaled MAP.

        Raises:
            ValueError: For an empty loader, or regression without ``sigma_noise``.
        """
        outputs, targets = network_outputs(model, val_loader)
        if likelihood == "classification":
            return cls(model, likelihood, fit_temperature(outputs, targets))
        if sigma_noise is None:
            raise ValueError("Temperature scaling of a regressor needs sigma_noise.")
        refitted = rms_residual(outputs, targets)
        return cls(model, likelihood, refitted / sigma_noise, refitted)

    @property
    def networks(self) -> list[nn.Module]:
        """The MAP network."""
        return [self.model]

    def __call__(self, x: Any) -> Tensor | tuple[Tensor, Tensor]:
        """``softmax(f(x) / T)``, or ``(f(x), σ_val²)``."""
        output = self.model(x)
        if self.likelihood == "classification":
            return torch.softmax(output / self.temperature, dim=-1)
        return output, torch.full_like(output, self.sigma_noise**2)


class DeepEnsemble(Predictive):
    """The average predictive of ``M`` networks: ``p(y | x) = (1/M) Σ_m p_m(y | x)``.

    Lakshminarayanan et al. (2017), "Simple and scalable predictive uncertainty
    estimation using deep ensembles". For regression the average of the members'
    Gaussians ``N(f_m(x), σ_m²)`` is reported by its mean and variance,
    ``μ = (1/M) Σ f_m`` and ``(1/M) Σ (σ_m² + f_m²) − μ²``.

    Attributes:
        members: The networks.
        likelihood: ``"classification"`` or ``"regression"``.
        sigma_noises: Each member's noise scale (regression), else ``None``.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        likelihood: str,
        sigma_noises: Sequence[float] | None = None,
    ) -> None:
        if len(members) < 1:
            raise ValueError("A deep ensemble needs at least one member.")
        if likelihood == "regression" and (
            sigma_noises is None or len(sigma_noises) != len(members)
        ):
            raise ValueError(
                "A regression ensemble needs one sigma_noise per member, got "
                f"{sigma_noises!r} for {len(members)} members."
            )
        self.members, self.likelihood = list(members), likelihood
        self.sigma_noises = None if sigma_noises is None else list(sigma_noises)

    @property
    def networks(self) -> list[nn.Module]:
        """The members."""
        return self.members

    def __call__(self, x: Any) -> Tensor | tuple[Tensor, Tensor]:
        """The members' mean probabilities, or the mixture's mean and variance."""
        outputs = [member(x) for member in self.members]
        if self.likelihood == "classification":
            return mixture_probs(outputs)
        return mixture_moments(outputs, self.sigma_noises)


class MCDropout(Predictive):
    """A dropout network averaged over masks: ``p(y | x) = (1/S) Σ_s p(y | x, m_s)``.

    Gal and Ghahramani (2016), "Dropout as a Bayesian approximation". Only the
    dropout modules run in training mode while predicting (batch norm keeps its
    running statistics); each batch draws ``S`` masks from torch's generator.

    Attributes:
        model: A network with dropout modules, trained with them.
        likelihood: ``"classification"`` or ``"regression"``.
        n_samples: Masks ``S`` per batch.
        sigma_noise: The noise scale (regression), else ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        n_samples: int = 100,
        sigma_noise: float | None = None,
    ) -> None:
        self.dropouts = [
            module
            for module in model.modules()
            if isinstance(module, nn.modules.dropout._DropoutNd)
        ]
        if not self.dropouts:
            raise ValueError(
                f"MC dropout needs a network with dropout modules; the "
                f"{type(model).__name__} given has none (train one with dropout)."
            )
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
        if likelihood == "regression" and sigma_noise is None:
            raise ValueError("MC dropout for regression needs sigma_noise.")
        self.model, self.likelihood = model, likelihood
        self.n_samples, self.sigma_noise = n_samples, sigma_noise

    @property
    def networks(self) -> list[nn.Module]:
        """The dropout network."""
        return [self.model]

    def __call__(self, x: Any) -> Tensor | tuple[Tensor, Tensor]:
        """The mean predictive over ``n_samples`` dropout masks."""
        modes = [module.training for module in self.dropouts]
        try:
            for module in self.dropouts:
                module.train()
            outputs = [self.model(x) for _ in range(self.n_samples)]
        finally:
            for module, mode in zip(self.dropouts, modes):
                module.train(mode)
        if self.likelihood == "classification":
            return mixture_probs(outputs)
        return mixture_moments(outputs, [self.sigma_noise] * self.n_samples)


def mixture_probs(logits: Sequence[Tensor]) -> Tensor:
    """``(1/M) Σ_m softmax(z_m)`` of ``M`` logit tensors ``(B, C)``."""
    return torch.stack([torch.softmax(z, dim=-1) for z in logits]).mean(0)


def mixture_moments(
    means: Sequence[Tensor], sigma_noises: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Mean and variance of the equal-weight mixture of ``N(μ_m, σ_m²)``.

    Args:
        means: ``M`` tensors ``(B, K)``.
        sigma_noises: ``M`` noise scales.

    Returns:
        ``μ = (1/M) Σ μ_m`` and ``(1/M) Σ (σ_m² + μ_m²) − μ²``, both ``(B, K)``.
    """
    stacked = torch.stack(list(means))
    mean = stacked.mean(0)
    noise = sum(s**2 for s in sigma_noises) / len(sigma_noises)
    spread = (stacked - mean).square().mean(0)
    return mean, spread + noise


def network_outputs(
    model: nn.Module, loader: Iterable[Any], name: str = "validation"
) -> tuple[Tensor, Tensor]:
    """The network's outputs and the targets over a loader, without gradients.

    Args:
        model: The network (its current train / eval mode is kept).
        loader: Batches ``(x, y)``.
        name: What the loader holds, for the error message.

    Returns:
        Outputs ``(N, C)`` and targets, on the CPU.

    Raises:
        ValueError: If the loader is empty.
    """
    device = module_device(model)
    outputs, targets = [], []
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            outputs.append(model(to_device(x, device)).detach().cpu())
            targets.append(y.detach().cpu())
    if not outputs:
        raise ValueError(f"The {name} loader is empty; pass a non-empty loader.")
    return torch.cat(outputs), torch.cat(targets)


def rms_residual(outputs: Tensor, targets: Tensor) -> float:
    """``sqrt(mean((f(x) − y)²))`` in float64, at least ``1e-6``.

    Args:
        outputs: Regression outputs ``(N, K)``.
        targets: Targets of ``N · K`` entries.

    Returns:
        The root-mean-square residual.
    """
    residuals = outputs.double() - targets.reshape(outputs.shape).double()
    return max(float(residuals.square().mean().sqrt()), 1e-6)


def residual_noise_scale(model: nn.Module, loader: Iterable[Any]) -> float:
    """Root-mean-square residual of the MAP: a plug-in regression noise scale.

    Args:
        model: The regression network.
        loader: Batches ``(X, y)``, usually the training data.

    Returns:
        ``sqrt(mean((f(x) - y)²))``, at least ``1e-6``.

    Raises:
        ValueError: If the loader is empty.
    """
    return rms_residual(*network_outputs(model, loader, "training"))


def fit_temperature(logits: Tensor, targets: Tensor, *, bound: float = 1e3) -> float:
    """The temperature ``T`` that minimises ``mean NLL(softmax(z / T), y)``.

    With ``β = 1/T`` the NLL ``mean(logsumexp(β z) − β z_y)`` is convex, with
    gradient ``mean(E_p[z] − z_y)`` and curvature ``mean(Var_p[z]) ≥ 0`` under
    ``p = softmax(β z)``; Newton's method with a backtracking line search finds its
    minimum in float64 to a gradient of about machine precision.

    Args:
        logits: ``(N, C)``.
        targets: Class indices ``(N,)``.
        bound: ``T`` is kept in ``[1/bound, bound]``; a bound is returned when the
            minimum lies beyond it. Separable data with every prediction right
            have their minimum at ``T → 0``: the search stops where the NLL's
            gradient vanishes in float64.

    Returns:
        ``T``.
    """
    logits = logits.detach().double()
    targets = targets.reshape(-1).long()
    true_logit = logits.gather(1, targets[:, None]).squeeze(1)

    def nll(beta: float) -> float:
        return float((torch.logsumexp(beta * logits, 1) - beta * true_logit).mean())

    beta, low, high = 1.0, 1.0 / bound, bound
    for _ in range(100):
        probs = torch.softmax(beta * logits, 1)
        expected = (probs * logits).sum(1)
        gradient = float((expected - true_logit).mean())
        curvature = float(
            (probs * logits.square()).sum(1).sub(expected.square()).mean()
        )
        if abs(gradient) < 1e-13 or (beta == high and gradient < 0):
            break
        if beta == low and gradient > 0:
            break
        step = (
            gradient / curvature
            if curvature > 1e-300
            else math.copysign(beta, gradient)
        )
        current, proposal = nll(beta), min(max(beta - step, low), high)
        while nll(proposal) > current and abs(proposal - beta) > 1e-15 * beta:
            proposal = 0.5 * (proposal + beta)
        if proposal == beta:
            break
        beta = proposal
    return 1.0 / beta

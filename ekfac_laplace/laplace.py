"""EKFAC Laplace approximations as laplace-torch ``ParametricLaplace`` subclasses.

Importing this module registers ``hessian_structure="ekfac"`` with
``laplace.Laplace(...)`` for ``subset_of_weights="all"`` and ``"last_layer"``.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from laplace.baselaplace import BaseLaplace, ParametricLaplace
from laplace.curvature import CurvatureInterface, CurvlinopsEF, CurvlinopsGGN
from laplace.lllaplace import LLLaplace
from laplace.utils.enums import Likelihood, PriorStructure
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader

from ekfac_laplace.curvature import (
    DEFAULT_SEED,
    ENGINES,
    LaplaceBatches,
    _validate_options,
    compute_ekfac,
)
from ekfac_laplace.engine import DEFAULT_CACHE_BUDGET_BYTES
from ekfac_laplace.matrix import DENSE_LIMIT_BYTES, EKFACDecomposed, check_dense_size
from ekfac_laplace.predictive import SharedModuleError, glm_predictive_variance

SUPPORTED_BACKENDS = (CurvlinopsGGN, CurvlinopsEF)


def _check_prior_values(prior_precision: float | Tensor) -> None:
    """Refuse a negative, NaN or infinite prior precision."""
    values = torch.as_tensor(
        prior_precision.detach()
        if isinstance(prior_precision, Tensor)
        else prior_precision
    )
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(
            f"prior_precision must be finite and non-negative, got "
            f"{values.flatten()[:8].tolist()}; a zero prior is allowed only where "
            "the curvature is positive."
        )


def _check_positive_scalar(name: str, value: float | Tensor) -> None:
    """Refuse a non-finite or non-positive ``sigma_noise`` / ``temperature``."""
    values = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value)
    if values.numel() != 1 or not bool(torch.isfinite(values).all()) or values <= 0:
        shown = values.flatten()[:8].tolist()
        raise ValueError(f"{name} must be one finite, positive number, got {shown}.")


def _fisher_type(backend: type[CurvatureInterface], backend_kwargs: dict) -> str:
    """Map a laplace-torch backend to the curvlinops Fisher type it stands for."""
    if isinstance(backend, type) and issubclass(backend, CurvlinopsEF):
        return "empirical"
    if isinstance(backend, type) and issubclass(backend, CurvlinopsGGN):
        return "mc" if backend_kwargs.get("stochastic", False) else "type2"
    name = getattr(backend, "__name__", repr(backend))
    raise ValueError(
        f"EKFAC Laplace does not support the backend {name}; use "
        "laplace.curvature.CurvlinopsGGN (exact GGN, or Monte-Carlo Fisher with "
        "backend_kwargs={'stochastic': True}) or laplace.curvature.CurvlinopsEF "
        "(empirical Fisher)."
    )


def _validated_options(
    backend: type[CurvatureInterface] | None,
    backend_kwargs: dict[str, Any] | None,
    kfac_approx: str,
    mc_samples: int,
    seed: int,
    engine: str,
    cache_budget_bytes: int,
    unsupported_layers: str = "diagonal",
) -> dict[str, Any]:
    """The EKFAC options of a Laplace object, checked before anything is set."""
    fisher_type = _fisher_type(
        CurvlinopsGGN if backend is None else backend, backend_kwargs or {}
    )
    _validate_options(fisher_type, kfac_approx, mc_samples, unsupported_layers)
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; choose one of {ENGINES}.")
    if not isinstance(cache_budget_bytes, int) or cache_budget_bytes < 0:
        raise ValueError(
            f"cache_budget_bytes must be a non-negative integer, got "
            f"{cache_budget_bytes!r}."
        )
    return {
        "unsupported_layers": unsupported_layers,
        "fisher_type": fisher_type,
        "kfac_approx": kfac_approx,
        "mc_samples": mc_samples,
        "seed": seed,
        "engine": engine,
        "cache_budget_bytes": cache_budget_bytes,
    }


class EKFACLaplace(ParametricLaplace):
    r"""Laplace approximation with an EKFAC posterior precision over all weights.

    For each parameter tensor (block) ``b`` with Kronecker eigenbasis
    ``Q_b = Q_G ⊗ Q_A`` and corrected eigenvalues ``λ_b`` of the log-likelihood
    GGN/Fisher (George et al., 2018), the posterior precision is

    $$
        P_b = Q_b \, \mathrm{diag}\big(λ_b / (σ^2 T) + δ_b\big) \, Q_b^\top ,
    $$

    with prior precision ``δ_b`` (scalar or one per parameter tensor), observation
    noise ``σ`` and temperature ``T``. Its inverse, log determinant, inverse square
    root (for sampling) and GLM predictive are exact in the eigenbasis.

    Args:
        model: The MAP network. Parameters (``requires_grad=True``) of ``nn.Linear``
            and ``nn.Conv2d`` get Kronecker-factored eigenbases; those of other
            modules (norm layers, embeddings, grouped convolutions, ...) diagonal
            blocks, the exact GGN / Fisher diagonal (see ``unsupported_layers``).
        likelihood: ``"classification"`` or ``"regression"``.
        sigma_noise: Observation noise (regression only).
        prior_precision: Scalar or one value per parameter tensor.
        prior_mean: Scalar or one value per parameter.
        temperature: Likelihood temperature.
        enable_backprop: Allow gradients through the predictive w.r.t. the input.
        dict_key_x: Input key of dict-like batches.
        dict_key_y: Target key of dict-like batches.
        backend: ``CurvlinopsGGN`` (default; ``backend_kwargs={"stochastic": True}``
            for the Monte-Carlo Fisher) or ``CurvlinopsEF`` (empirical Fisher).
        backend_kwargs: Passed to the backend, which computes the GLM Jacobians.
        asdl_fisher_kwargs: For compatibility with ``KronLaplace``: may carry
            ``kfac_approx`` and ``mc_samples``.
        kfac_approx: ``"expand"`` (default) or ``"reduce"`` for ``Conv2d``.
        mc_samples: Labels sampled per example for the Monte-Carlo Fisher.
        seed: Seed of the Monte-Carlo label sampler (fits are reproducible).
        engine: ``"fast"`` (default) or ``"curvlinops"``; see
            :func:`ekfac_laplace.compute_ekfac`.
        cache_budget_bytes: Memory the fast engine may use to skip its second pass.
        unsupported_layers: ``"diagonal"`` (default) gives parameters of modules
            other than ``nn.Linear`` / ``nn.Conv2d`` a diagonal block (EKFAC in the
            identity basis); ``"raise"`` refuses them at ``fit``.

    Raises:
        ValueError: For an unsupported backend or option.
    """

    _key = ("all", "ekfac")

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        kfac_approx: str = "expand",
        mc_samples: int = 1,
        seed: int = DEFAULT_SEED,
        engine: str = "fast",
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
        unsupported_layers: str = "diagonal",
    ) -> None:
        if likelihood not in (Likelihood.CLASSIFICATION, Likelihood.REGRESSION):
            raise ValueError(
                f"EKFAC Laplace supports likelihood='classification' or 'regression', "
                f"got {likelihood!r}."
            )
        extra = dict(asdl_fisher_kwargs or {})
        unknown = set(extra) - {"kfac_approx", "mc_samples"}
        if unknown:
            raise ValueError(
                f"asdl_fisher_kwargs keys {sorted(unknown)} are not used by EKFAC; "
                "only 'kfac_approx' and 'mc_samples' are."
            )
        _check_prior_values(prior_precision)
        options = _validated_options(
            backend,
            backend_kwargs,
            extra.get("kfac_approx", kfac_approx),
            extra.get("mc_samples", mc_samples),
            seed,
            engine,
            cache_budget_bytes,
            unsupported_layers,
        )
        self._set_options(options)
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
        )

    def _set_options(self, options: dict[str, Any]) -> None:
        self.fisher_type: str = options["fisher_type"]
        self.kfac_approx: str = options["kfac_approx"]
        self.mc_samples: int = options["mc_samples"]
        self.seed: int = options["seed"]
        self.engine: str = options["engine"]
        self.cache_budget_bytes: int = options["cache_budget_bytes"]
        self.unsupported_layers: str = options["unsupported_layers"]

    # ----------------------------------------------------------------- fitting
    def _init_H(self) -> None:
        self.H = None

    # Dense results above this size are refused with a MemoryError that says so;
    # set to None (or a larger number) to allow them.
    dense_limit_bytes: int | None = DENSE_LIMIT_BYTES

    @property
    def temperature(self) -> float:
        """Likelihood temperature ``T`` (finite, positive)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        _check_positive_scalar("temperature", value)
        self._temperature = float(value)

    @BaseLaplace.sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        """Set the observation noise ``σ`` (finite, positive)."""
        _check_positive_scalar("sigma_noise", value)
        BaseLaplace.sigma_noise.fset(self, value)

    def _check_H_init(self) -> None:
        if getattr(self, "H", None) is None:
            raise AttributeError(
                f"{type(self).__name__} is not fitted: call .fit(train_loader) first."
            )

    def _curvature_params(self) -> list[Tensor]:
        return [p for p in self.params]

    def _mean_vector(self) -> Tensor:
        return parameters_to_vector(self.params)

    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
    ) -> None:
        """Fit EKFAC over the whole training loader (two passes).

        With ``override=False`` after an earlier fit (online / continual learning),
        the eigenbasis of the first fit is kept and the new data's corrected
        eigenvalues, computed in that basis, are added: fitting the same data twice
        doubles ``λ`` exactly, and fitting A then B gives
        ``diag(Qᵀ (GGN_A + GGN_B) Q)`` in A's basis. ``loss`` and ``n_data``
        accumulate and the mean moves to the current parameters, as in
        laplace-torch.

        Args:
            train_loader: Batches ``(X, y)`` or dict-like batches;
                ``train_loader.dataset`` must have a length (``N``).
            override: Start from scratch (default) or add to the previous fit.
            progress_bar: Show tqdm progress over both passes.

        Raises:
            ValueError: For an empty loader, unknown ``N``, mismatched targets,
                unsupported layers or non-finite curvature. The object is unchanged.
        """
        num_data = self._dataset_size(train_loader)
        self.model.eval()
        batches = LaplaceBatches(train_loader, self.dict_key_y)
        n_outputs = self._infer_n_outputs(train_loader)

        previous = None if override else self.H
        factors = compute_ekfac(
            self.model,
            self._curvature_params(),
            batches,
            self.likelihood,
            num_data,
            fisher_type=self.fisher_type,
            kfac_approx=self.kfac_approx,
            mc_samples=self.mc_samples,
            seed=self.seed,
            dict_key_x=self.dict_key_x,
            eigenbasis=None if previous is None else previous.eigenvectors,
            progress_bar=progress_bar,
            engine=self.engine,
            cache_budget_bytes=self.cache_budget_bytes,
            unsupported_layers=self.unsupported_layers,
        )

        # Everything is computed: only now change the object.
        mean = self._mean_vector()
        self.mean = mean if self.enable_backprop else mean.detach()
        self.n_outputs = n_outputs
        self.model.output_size = n_outputs
        if previous is None:
            self.H = factors.to_decomposed()
            self.loss = factors.loss
            self.n_data = num_data
        else:
            self.H = EKFACDecomposed(
                previous.eigenvectors,
                [
                    old + new
                    for old, new in zip(previous.eigenvalues, factors.eigenvalues)
                ],
            )
            self.loss = self.loss + factors.loss
            self.n_data = self.n_data + num_data

    @staticmethod
    def _dataset_size(train_loader: DataLoader) -> int:
        dataset = getattr(train_loader, "dataset", None)
        try:
            num_data = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                "fit needs train_loader.dataset with a length (the number of training "
                "points N); wrap the data in a map-style Dataset such as "
                "torch.utils.data.TensorDataset."
            ) from None
        if num_data == 0:
            raise ValueError("fit got an empty training set (len(dataset) == 0).")
        return num_data

    @torch.no_grad()
    def _infer_n_outputs(self, train_loader: DataLoader) -> int:
        try:
            batch = next(iter(train_loader))
        except StopIteration:
            raise ValueError("fit got a train_loader that yields no batches.") from None
        if isinstance(batch, MutableMapping):
            out = self.model(batch)
            y = batch.get(self.dict_key_y)
        else:
            X, y = batch
            out = self.model(X.to(self._device))
        if out.ndim != 2:
            raise ValueError(
                f"EKFAC Laplace needs model outputs of shape (batch, outputs), got "
                f"{tuple(out.shape)}; flatten sequence outputs into the batch "
                "dimension."
            )
        if y is not None:
            if self.likelihood == Likelihood.REGRESSION and y.shape != out.shape:
                raise ValueError(
                    f"Regression targets have shape {tuple(y.shape)} but the model "
                    f"outputs {tuple(out.shape)}; they must match, e.g. "
                    "y.reshape(-1, 1)."
                )
            is_indices = y.ndim == 1 and y.shape[0] == out.shape[0]
            is_probabilities = y.shape == out.shape and y.is_floating_point()
            if self.likelihood == Likelihood.CLASSIFICATION and not (
                is_indices or is_probabilities
            ):
                raise ValueError(
                    f"Classification targets must be class indices of shape (batch,) "
                    f"or class probabilities of shape (batch, classes), got "
                    f"{tuple(y.shape)} for outputs {tuple(out.shape)}."
                )
        return out.shape[-1]

    # --------------------------------------------------------------- posterior
    @property
    def posterior_precision(self) -> EKFACDecomposed:
        """Posterior precision ``H / (σ² T) + δ`` as an :class:`EKFACDecomposed`."""
        self._check_H_init()
        return self.H * self._H_factor + self.prior_precision

    @property
    def posterior_covariance(self) -> Tensor:
        """Dense posterior covariance ``P⁻¹`` of shape ``(P, P)`` (small models).

        Refused (``MemoryError``) above ``dense_limit_bytes``.
        """
        return self.posterior_precision.to_matrix(
            exponent=-1, max_bytes=self.dense_limit_bytes
        )

    @property
    def posterior_variance(self) -> Tensor:
        """Marginal posterior variances ``diag(P⁻¹)`` of shape ``(P,)``."""
        return self.posterior_precision.diag(exponent=-1)

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P``, exact from the eigenvalues."""
        return self.posterior_precision.logdet()

    def square_norm(self, value: Tensor) -> Tensor:
        """``(value - mean)ᵀ P (value - mean)``.

        Args:
            value: Shape ``(P,)``.

        Returns:
            Scalar tensor.
        """
        delta = value - self.mean
        return delta @ self.posterior_precision.bmm(delta, exponent=1)

    @torch.enable_grad()
    def _glm_predictive_distribution(
        self,
        X: Tensor | MutableMapping[str, Any],
        joint: bool = False,
        diagonal_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """GLM predictive mean and variance, Jacobian-free where possible.

        The per-input and the joint covariance are computed layer by layer in the
        eigenbasis (:mod:`ekfac_laplace.predictive`) without forming the
        ``(batch, outputs, parameters)`` Jacobian. ``enable_backprop=True`` and
        models that reuse a layer within one forward pass take laplace-torch's
        dense-Jacobian path.
        """
        self._check_H_init()
        if joint:
            batch = self._batch_size(X)
            check_dense_size(
                (batch * self.n_outputs, batch * self.n_outputs),
                self._dtype,
                "joint predictive covariance",
                self.dense_limit_bytes,
            )
        if not self.enable_backprop:
            if isinstance(X, Tensor):
                X = X.to(self._device)
            try:
                f_mu, f_var = glm_predictive_variance(
                    self.model,
                    self._curvature_params(),
                    self.posterior_precision,
                    X,
                    joint=joint,
                )
            except SharedModuleError:
                pass
            else:
                if diagonal_output and not joint:
                    f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
                return f_mu, f_var
        return self._dense_glm_predictive_distribution(X, joint, diagonal_output)

    def _dense_glm_predictive_distribution(
        self, X: Tensor | MutableMapping[str, Any], joint: bool, diagonal_output: bool
    ) -> tuple[Tensor, Tensor]:
        self._check_jacobian_size(X)
        return ParametricLaplace._glm_predictive_distribution(
            self, X, joint=joint, diagonal_output=diagonal_output
        )

    def _batch_size(self, X: Tensor | MutableMapping[str, Any]) -> int:
        if isinstance(X, MutableMapping):
            return int(X[self.dict_key_x].shape[0])
        return int(X.shape[0])

    def _check_jacobian_size(self, X: Tensor | MutableMapping[str, Any]) -> None:
        """laplace-torch's dense path forms ``(B, K, P)`` Jacobians: bound them."""
        check_dense_size(
            (self._batch_size(X), self.n_outputs, self.n_params),
            self._dtype,
            "Jacobian of laplace-torch's predictive (enable_backprop=True or a "
            "reused layer)",
            self.dense_limit_bytes,
        )

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``J P⁻¹ Jᵀ`` per input.

        Args:
            Js: Jacobians of shape ``(B, K, P)``.

        Returns:
            Shape ``(B, K, K)``.
        """
        return self.posterior_precision.inv_square_form(Js)

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """Joint ``J P⁻¹ Jᵀ`` over all inputs and outputs.

        Args:
            Js: Jacobians of shape ``(B, K, P)``.

        Returns:
            Shape ``(B·K, B·K)``.
        """
        self._check_jacobians(Js)
        n_batch, n_outs, n_params = Js.shape
        flat = Js.reshape(1, n_batch * n_outs, n_params)
        return self.posterior_precision.inv_square_form(flat).squeeze(0)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Posterior samples ``θ* + Q diag((λ/(σ²T) + δ)^{-1/2}) z``, ``z ~ N(0, I)``.

        Args:
            n_samples: Number of samples.
            generator: Random generator on the model's device.

        Returns:
            Shape ``(n_samples, P)``.
        """
        precision = self.posterior_precision
        z = torch.randn(
            n_samples,
            self.n_params,
            device=self._device,
            dtype=self._dtype,
            generator=generator,
        )
        return self.mean.reshape(1, -1) + precision.eigenbasis_matmul(z, exponent=-0.5)

    # ------------------------------------------------------------------ prior
    def _block_sizes(self) -> list[int]:
        return [p.numel() for p in self._curvature_params()]

    @property
    def log_det_prior_precision(self) -> Tensor:
        """``log det P₀ = Σ_b n_b log δ_b``, without forming the diagonal."""
        prior = self.prior_precision
        sizes = self._block_sizes()
        if len(prior) == 1:
            return sum(sizes) * prior[0].log()
        return (torch.as_tensor(sizes, device=prior.device) * prior.log()).sum()

    @property
    def scatter(self) -> Tensor:
        """``(θ* − μ₀)ᵀ P₀ (θ* − μ₀) = Σ_b δ_b ‖θ*_b − μ₀_b‖²``."""
        prior = self.prior_precision
        delta = self.mean - self.prior_mean
        if len(prior) == 1:
            return prior[0] * delta.square().sum()
        norms = torch.stack(
            [chunk.square().sum() for chunk in delta.split(self._block_sizes())]
        )
        return (prior * norms).sum()

    @property
    def prior_precision_diag(self) -> Tensor:
        """Diagonal of the prior precision (scalar or per-layer prior), ``(P,)``."""
        sizes = [p.numel() for p in self._curvature_params()]
        prior = self.prior_precision
        if len(prior) == 1:
            return prior * torch.ones(
                sum(sizes), device=prior.device, dtype=prior.dtype
            )
        return torch.repeat_interleave(
            prior, torch.as_tensor(sizes, device=prior.device)
        )

    @BaseLaplace.prior_precision.setter
    def prior_precision(self, prior_precision: float | Tensor) -> None:
        """Set a scalar or per-layer prior precision; per-parameter is refused."""
        _check_prior_values(prior_precision)
        if isinstance(prior_precision, Tensor) and prior_precision.ndim == 1:
            n_layers = getattr(self, "n_layers", None)
            if n_layers is not None and len(prior_precision) not in (1, n_layers):
                raise ValueError(
                    "EKFAC Laplace takes a scalar prior precision or one per "
                    f"parameter tensor ({n_layers}), got {len(prior_precision)} "
                    "values. A diagonal (per-parameter) prior is not diagonal in the "
                    "EKFAC eigenbasis; use hessian_structure='diag' or 'full' for that."
                )
        BaseLaplace.prior_precision.fset(self, prior_precision)

    def optimize_prior_precision(
        self,
        pred_type: str = "glm",
        method: str = "marglik",
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """laplace-torch's prior tuning, restricted to scalar and layerwise priors.

        Args:
            pred_type: ``"glm"`` or ``"nn"`` (for ``method="gridsearch"``).
            method: ``"marglik"`` or ``"gridsearch"``.
            n_steps: Adam steps for ``"marglik"``.
            lr: Adam learning rate for ``"marglik"``.
            init_prior_prec: Initial prior precision.
            prior_structure: ``"scalar"`` or ``"layerwise"``.
            *args: Further positional arguments of laplace-torch's method.
            **kwargs: Further keyword arguments of laplace-torch's method.

        Raises:
            ValueError: For ``prior_structure="diag"`` or a per-parameter initial value.
        """
        if prior_structure == PriorStructure.DIAG:
            raise ValueError(
                "prior_structure='diag' is not supported by EKFAC Laplace: a "
                "per-parameter prior is not diagonal in the Kronecker eigenbasis, so "
                "log det and inverse would no longer be exact. Use 'scalar' or "
                "'layerwise'."
            )
        if isinstance(init_prior_prec, Tensor) and init_prior_prec.ndim == 1:
            if len(init_prior_prec) not in (1, self.n_layers):
                raise ValueError(
                    f"init_prior_prec has {len(init_prior_prec)} values; EKFAC takes a "
                    f"scalar or one per parameter tensor ({self.n_layers})."
                )
        self._check_H_init()
        super().optimize_prior_precision(
            pred_type,
            method,
            n_steps,
            lr,
            init_prior_prec,
            prior_structure,
            *args,
            **kwargs,
        )

    # ---------------------------------------------------------- serialisation
    def state_dict(self) -> dict[str, Any]:
        """State as plain tensors and numbers (``torch.save`` friendly).

        Returns:
            laplace-torch's state with ``H`` as eigenvectors and eigenvalues.
        """
        state = super().state_dict()
        state["H"] = {
            "eigenvectors": [list(basis) for basis in self.H.eigenvectors],
            "eigenvalues": list(self.H.eigenvalues),
        }
        state["ekfac"] = {
            "fisher_type": self.fisher_type,
            "kfac_approx": self.kfac_approx,
            "mc_samples": self.mc_samples,
            "seed": self.seed,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, validating it first.

        Args:
            state_dict: A state produced by the same class for the same model.

        Raises:
            ValueError: If the state is from another class, model or likelihood.
        """
        if state_dict.get("cls_name") != type(self).__name__:
            raise ValueError(
                f"The state is from {state_dict.get('cls_name')!r}, not "
                f"{type(self).__name__}; load it into the class that saved it."
            )
        if state_dict.get("likelihood") != self.likelihood:
            raise ValueError(
                f"The state is for likelihood {state_dict.get('likelihood')!r}, this "
                f"Laplace uses {self.likelihood!r}."
            )
        H = state_dict.get("H")
        if not isinstance(H, dict) or {"eigenvectors", "eigenvalues"} - set(H):
            raise ValueError("The state has no EKFAC eigenvectors and eigenvalues.")
        decomposed = EKFACDecomposed(
            [tuple(basis) for basis in H["eigenvectors"]], H["eigenvalues"]
        )
        self._check_state_blocks(decomposed)
        super().load_state_dict(state_dict)
        self.H = decomposed
        options = state_dict.get("ekfac", {})
        self.fisher_type = options.get("fisher_type", self.fisher_type)
        self.kfac_approx = options.get("kfac_approx", self.kfac_approx)
        self.mc_samples = options.get("mc_samples", self.mc_samples)
        self.seed = options.get("seed", self.seed)

    def _check_state_blocks(self, decomposed: EKFACDecomposed) -> None:
        shapes = [p.numel() for p in self._curvature_params()]
        if decomposed.block_sizes != shapes:
            raise ValueError(
                f"The state's EKFAC blocks have sizes {decomposed.block_sizes} but "
                f"this model's parameter tensors have sizes {shapes}; load it into the "
                "model it was fitted on."
            )


class EKFACLLLaplace(LLLaplace, EKFACLaplace):
    r"""Last-layer Laplace approximation with an EKFAC posterior precision.

    Only the parameters of the last ``nn.Linear`` layer are treated
    probabilistically; the posterior precision of its weight and bias blocks is

    $$
        P_b = (Q_G \otimes Q_A) \, \mathrm{diag}\big(λ_b / (σ^2 T) + δ_b\big) \,
        (Q_G \otimes Q_A)^\top .
    $$

    Unlike laplace-torch's last-layer classes, a per-layer prior (one value for the
    weight, one for the bias) is supported. ``fit(override=False)`` is refused, as in
    laplace-torch.

    Args:
        model: The MAP network.
        likelihood: ``"classification"`` or ``"regression"``.
        sigma_noise: Observation noise (regression only).
        prior_precision: Scalar or one value per last-layer parameter tensor.
        prior_mean: Scalar or one value per last-layer parameter.
        temperature: Likelihood temperature.
        enable_backprop: Allow gradients through the predictive w.r.t. the input.
        feature_reduction: How laplace-torch reduces >2-D features.
        dict_key_x: Input key of dict-like batches.
        dict_key_y: Target key of dict-like batches.
        backend: ``CurvlinopsGGN`` (default) or ``CurvlinopsEF``.
        last_layer_name: Name of the last layer; found automatically if ``None``.
        backend_kwargs: Passed to the backend.
        asdl_fisher_kwargs: Not supported for last-layer Laplace (laplace-torch).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        mc_samples: Labels sampled per example for the Monte-Carlo Fisher.
        seed: Seed of the Monte-Carlo label sampler.
        engine: ``"fast"`` (default) or ``"curvlinops"``.
        cache_budget_bytes: Memory the fast engine may use to skip its second pass.
    """

    _key = ("last_layer", "ekfac")

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        last_layer_name: str | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        kfac_approx: str = "expand",
        mc_samples: int = 1,
        seed: int = DEFAULT_SEED,
        engine: str = "fast",
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
    ) -> None:
        _check_prior_values(prior_precision)
        options = _validated_options(
            backend,
            backend_kwargs,
            kfac_approx,
            mc_samples,
            seed,
            engine,
            cache_budget_bytes,
        )
        LLLaplace.__init__(
            self,
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            feature_reduction=feature_reduction,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            last_layer_name=last_layer_name,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
        )
        # LLLaplace.__init__ ran EKFACLaplace.__init__ with default options.
        self._set_options(options)

    def _curvature_params(self) -> list[Tensor]:
        return [p for p in self.model.last_layer.parameters() if p.requires_grad]

    def _mean_vector(self) -> Tensor:
        return parameters_to_vector(self.model.last_layer.parameters())

    # LLLaplace's version knows only scalar and diagonal priors; ours adds per-layer.
    prior_precision_diag = EKFACLaplace.prior_precision_diag
    log_det_prior_precision = EKFACLaplace.log_det_prior_precision
    scatter = EKFACLaplace.scatter

    _glm_predictive_distribution = EKFACLaplace._glm_predictive_distribution

    def _dense_glm_predictive_distribution(
        self, X: Tensor | MutableMapping[str, Any], joint: bool, diagonal_output: bool
    ) -> tuple[Tensor, Tensor]:
        return LLLaplace._glm_predictive_distribution(
            self, X, joint=joint, diagonal_output=diagonal_output
        )

    def _nn_functional_samples(
        self,
        X: Tensor | MutableMapping[str, Any],
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """Last-layer NN samples (laplace-torch 0.3 writes them into all weights).

        Features are computed once; each sample only reruns the last layer.
        """
        last_layer = self.model.last_layer
        if isinstance(X, Tensor):
            X = X.to(self._device)
        outputs, features = [], None
        try:
            for sample in self.sample(n_samples, generator):
                vector_to_parameters(sample, last_layer.parameters())
                if features is None:
                    f, features = self.model.forward_with_features(X, **model_kwargs)
                else:
                    f = last_layer(features)
                outputs.append(f if self.enable_backprop else f.detach())
        finally:
            vector_to_parameters(self.mean, last_layer.parameters())
        return torch.stack(outputs)

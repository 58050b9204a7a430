r"""The EKFAC posterior: what EKFACLaplace and EKFACLLLaplace share.

:class:`EKFACPosterior` is a laplace-torch ``ParametricLaplace`` whose posterior
precision is an :class:`~ekfac_laplace.EKFACDecomposed`: fitting it
(:func:`ekfac_laplace.compute_ekfac`), its inverse, log determinant, samples,
marginal likelihood terms, the Jacobian-free GLM predictive
(:mod:`ekfac_laplace.predictive`) and its state. The registered classes are in
:mod:`ekfac_laplace.laplace`.

Why :meth:`EKFACPosterior.fit` does not call laplace-torch's ``ParametricLaplace.fit``:
that method sums the curvature batch by batch (``H += H_batch``), but EKFAC's
eigenvalue correction needs the eigenbasis of the *whole* data set's Kronecker factors,
so the curvature is computed over the whole loader at once. Everything else
``ParametricLaplace.fit`` sets up is set the same way in one place,
:meth:`EKFACPosterior._commit_fit`: ``mean`` (detached unless ``enable_backprop``),
``n_outputs``, ``model.output_size``, ``loss`` and ``n_data`` (accumulated with
``override=False``). The last-layer class does call laplace-torch's ``LLLaplace.fit``,
which finds the last layer and then calls ours.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from laplace.baselaplace import BaseLaplace, ParametricLaplace
from laplace.utils.enums import Likelihood, PriorStructure
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters
from torch.utils.data import DataLoader

from ekfac_laplace._compat import (
    check_jacobians,
    likelihood_scale,
    model_device,
    model_dtype,
    tensor_version,
)
from ekfac_laplace.batches import (
    LaplaceBatches,
    batch_size,
    check_reiterable,
    dataset_size,
    output_size,
    to_device,
)
from ekfac_laplace.blocks import structure_named
from ekfac_laplace.curvature import compute_ekfac
from ekfac_laplace.distributed import ranks_of, warn_about_an_unshared_shard
from ekfac_laplace.errors import CaptureError
from ekfac_laplace.factors import EKFACFactors
from ekfac_laplace.fitted import FittedLayout
from ekfac_laplace.hyperparameters import (
    check_finite,
    check_positive_scalar,
    check_prior_precision,
)
from ekfac_laplace.matrix import DENSE_LIMIT_BYTES, EKFACDecomposed, check_dense_size
from ekfac_laplace.options import EKFACOptions
from ekfac_laplace.parameters import parameters_kept, parameters_vector, tensor_digest
from ekfac_laplace.predictive import glm_predictive_variance
from ekfac_laplace.sketch import corrected_matrix, merged_eigenpairs
from ekfac_laplace.state import (
    CheckedState,
    check_state_header,
    checked_state,
    restored_on_failure,
)


def _same_key(first: tuple, second: tuple) -> bool:
    """Whether two memo keys match: the same objects, the same numbers."""
    return len(first) == len(second) and all(
        a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)
        for a, b in zip(first, second)
    )


class EKFACPosterior(ParametricLaplace):
    r"""The EKFAC posterior shared by :class:`EKFACLaplace` and :class:`EKFACLLLaplace`.

    For each parameter tensor (block) ``b`` with Kronecker eigenbasis
    ``Q_b = Q_G ⊗ Q_A`` and corrected eigenvalues ``λ_b`` of the log-likelihood
    GGN/Fisher (George et al., 2018), the posterior precision is

    $$
        P_b = Q_b \, \mathrm{diag}\big(λ_b / (σ^2 T) + δ_b\big) \, Q_b^\top ,
    $$

    with prior precision ``δ_b`` (scalar or one per parameter tensor), observation
    noise ``σ`` and temperature ``T``. Its inverse, log determinant, inverse square
    root (for sampling) and GLM predictive are exact in the eigenbasis. With a
    ``correction_rank`` ``k``, a Kronecker block is
    ``Q_b (diag(D_b) + U_b S_b U_bᵀ) Q_bᵀ / (σ² T) + δ_b`` instead
    (:mod:`ekfac_laplace.sketch`), and every one of these stays exact (Woodbury,
    the determinant lemma). Not constructed directly: it has no ``__init__`` and no
    ``_key``.

    Attributes:
        options: How the curvature is computed (:class:`~ekfac_laplace.EKFACOptions`).
        dense_limit_bytes: Dense results above this size (posterior covariance, joint
            predictive covariance, laplace-torch's Jacobians) are refused with a
            ``MemoryError``; ``None`` allows any size.
    """

    options: EKFACOptions
    process_group: Any | None = None
    dense_limit_bytes: int | None = DENSE_LIMIT_BYTES

    # --------------------------------------------------------- hyperparameters
    def _init_H(self) -> None:
        self.H: EKFACDecomposed | None = None
        self._fitted: FittedLayout | None = None
        #: With a ``correction_rank``: a corrected block's index to ``diag(R)``
        #: (its eigenvalues in ``H`` are ``D``), kept for online fits and states.
        self._diagonals: dict[int, Tensor] = {}

    @property
    def fitted_layout(self) -> FittedLayout:
        """The fit's layout: every block's structure, kind and shapes.

        Raises:
            AttributeError: If the object is not fitted.
        """
        self._check_H_init()
        return self._fitted

    @fitted_layout.setter
    def fitted_layout(self, layout: FittedLayout) -> None:
        """Set another layout for ``H`` (a structure selection sets both)."""
        self._fitted = layout

    @property
    def correction_diagonals(self) -> dict[int, Tensor]:
        """A block with a low-rank correction's index to its ``diag(R)``.

        Its eigenvalues in ``H`` are ``D = diag(R − U S Uᵀ)``; online fits and
        states need ``diag(R)`` itself (:mod:`ekfac_laplace.sketch`).
        """
        return self._diagonals

    @correction_diagonals.setter
    def correction_diagonals(self, diagonals: dict[int, Tensor]) -> None:
        """Set them with ``H`` (a structure selection sets all three)."""
        self._diagonals = dict(diagonals)

    def _check_H_init(self) -> None:
        if getattr(self, "H", None) is None:
            raise AttributeError(
                f"{type(self).__name__} is not fitted: call .fit(train_loader) first."
            )

    @property
    def temperature(self) -> float:
        """Likelihood temperature ``T`` (finite, positive)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        check_positive_scalar("temperature", value)
        self._temperature = float(value)

    @BaseLaplace.sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        """Set the observation noise ``σ`` (finite, positive)."""
        check_positive_scalar("sigma_noise", value)
        BaseLaplace.sigma_noise.fset(self, value)

    @BaseLaplace.prior_mean.setter
    def prior_mean(self, prior_mean: float | Tensor) -> None:
        """Set the prior mean ``μ₀`` (finite; scalar or one per parameter)."""
        check_finite("prior_mean", prior_mean)
        BaseLaplace.prior_mean.fset(self, prior_mean)

    @BaseLaplace.prior_precision.setter
    def prior_precision(self, prior_precision: float | Tensor) -> None:
        """Set a scalar or per-layer prior precision; per-parameter is refused."""
        check_prior_precision(prior_precision)
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

    @property
    def _curvature_likelihood(self) -> Likelihood:
        """The likelihood of the curvature: reward modelling fits as classification."""
        if self.likelihood == Likelihood.REWARD_MODELING:
            return Likelihood.CLASSIFICATION
        return Likelihood(self.likelihood)

    # ----------------------------------------- what the posterior is over
    def _posterior_params(self) -> list[Tensor]:
        """The parameters of the posterior, in vector order."""
        return list(self.params)

    @property
    def posterior_parameters(self) -> list[Tensor]:
        """The parameters of the posterior, in vector order (the blocks of ``H``).

        The last layer's for a last-layer Laplace.
        """
        return self._posterior_params()

    def _mean_vector(self) -> Tensor:
        """The current values of those parameters, flattened."""
        return parameters_vector(self.params)

    def _block_sizes(self) -> list[int]:
        return [p.numel() for p in self._posterior_params()]

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
    ) -> None:
        """Fit EKFAC over the whole training loader (two passes, or one and a replay).

        With ``override=False`` after an earlier fit (online / continual learning),
        the eigenbasis of the first fit is kept and the new data's corrected
        eigenvalues, computed in that basis, are added: fitting the same data twice
        doubles ``λ`` exactly, and fitting A then B gives
        ``diag(Qᵀ (GGN_A + GGN_B) Q)`` in A's basis; an exact (dense) block is
        rebuilt as ``GGN_A + GGN_B`` and decomposed again, so it stays exact.
        ``loss`` and ``n_data``
        accumulate and the mean moves to the current parameters, as in
        laplace-torch.

        Args:
            train_loader: Batches ``(X, y)`` or dict-like batches;
                ``train_loader.dataset`` must have a length (``N``).
            override: Start from scratch (default) or add to the previous fit.
            progress_bar: Show a progress bar over each pass.

        In a data-parallel fit (``process_group``), each rank passes the loader of
        its own shard; every rank ends with the posterior of the union of the
        shards, ``N`` the total number of examples (see
        :mod:`ekfac_laplace.distributed`).

        Raises:
            ValueError: For an empty loader, unknown ``N``, mismatched targets,
                unsupported layers or non-finite curvature, or ranks that disagree
                on the model. The object is unchanged (on every rank).
            DistributedFitError: On the other ranks when one fails, or when a
                collective times out.
        """
        previous = None if override else self.H
        factors, n_outputs, num_data = self._fit_factors(
            train_loader, self.options, previous, progress_bar, override=override
        )
        self._commit_fit(factors, previous, n_outputs, num_data)

    def curvature(
        self,
        train_loader: DataLoader,
        *,
        diagonal_blocks: bool = False,
        progress_bar: bool = False,
        **options: Any,
    ) -> EKFACFactors:
        """The curvature a fit with other options would give; nothing is changed.

        Args:
            train_loader: The training data, as for :meth:`fit`.
            diagonal_blocks: Every tensor's exact diagonal block instead (the
                Kronecker layers' too).
            progress_bar: Show a progress bar over each pass.
            **options: Options that differ from this object's
                (:class:`~ekfac_laplace.EKFACOptions`), e.g.
                ``dense_blocks_up_to``.

        Returns:
            The eigenbases and eigenvalues (without the likelihood's scale ``1/σ²``
            and the prior), as :meth:`fit` would set them as ``H``.

        Raises:
            ValueError: As :meth:`fit`, and for an unknown option.
        """
        factors, _, _ = self._fit_factors(
            train_loader,
            self.options.replaced(**options),
            None,
            progress_bar,
            diagonal_blocks=diagonal_blocks,
        )
        return factors

    def _fit_factors(
        self,
        train_loader: DataLoader,
        options: EKFACOptions,
        previous: EKFACDecomposed | None,
        progress_bar: bool,
        override: bool = True,
        diagonal_blocks: bool = False,
    ) -> tuple[EKFACFactors, int, int]:
        """The checked curvature of a fit: factors, output size and ``N``."""
        ranks = ranks_of(self.process_group)
        warn_about_an_unshared_shard(train_loader, self.process_group)
        self.model.eval()
        batches = LaplaceBatches(train_loader, self.dict_key_y, self.dict_key_x)
        likelihood = self._curvature_likelihood
        num_data, n_outputs = ranks.run(  # every rank learns whether all passed
            lambda: (
                check_reiterable(train_loader),
                dataset_size(train_loader, shard=ranks.size > 1),
                output_size(
                    self.model, batches, likelihood, model_device(self), self.dict_key_x
                ),
            )[1:],
            "the checks of the first batch",
        )
        ranks.same(lambda: self._fit_signature(override), "the model, options and fit")
        model, batches = self._curvature_model(batches)
        factors = compute_ekfac(
            model,
            self._posterior_params(),
            batches,
            likelihood,
            num_data,
            options,
            eigenbasis=None if previous is None else previous.eigenvectors,
            fitted=None if previous is None else self._fitted,
            dict_key_x=self.dict_key_x,
            progress_bar=progress_bar and ranks.rank == 0,
            process_group=self.process_group,
            diagonal_blocks=diagonal_blocks,
        )
        if factors.tokens is not None:  # token-level outputs: each token counts
            num_data = factors.tokens
        else:
            num_data = ranks.total(num_data)
        return factors, n_outputs, num_data

    def _curvature_model(self, batches: LaplaceBatches) -> tuple[nn.Module, Any]:
        """The network whose curvature the fit takes, and its batches."""
        return self.model, batches

    def _jacobian_free_predictive(
        self, X: Tensor | Mapping[str, Any], joint: bool
    ) -> tuple[Tensor, Tensor]:
        """The GLM predictive of :mod:`ekfac_laplace.predictive` on ``X``."""
        return glm_predictive_variance(
            self.model,
            self._posterior_params(),
            self.posterior_precision,
            to_device(X, model_device(self)),
            self.fitted_layout,
            joint=joint,
            batch=batch_size(X, self.dict_key_x),
        )

    def _fit_signature(self, override: bool) -> dict[str, object]:
        """What every rank of a data-parallel fit must share.

        The parameters' values enter bit for bit, through a SHA-256 digest of each
        tensor's bytes; so do the prior and the likelihood's hyperparameters.
        """
        params = self._posterior_params()
        return {
            "the class": type(self).__name__,
            "the likelihood": str(self.likelihood),
            "the parameter shapes": [tuple(p.shape) for p in params],
            "the dtype": str(model_dtype(self)),
            "the parameter values (SHA-256 per tensor)": [
                tensor_digest(p) for p in params
            ],
            "the prior precision": self.prior_precision.tolist(),
            "the prior mean (SHA-256)": tensor_digest(self.prior_mean),
            "sigma_noise": float(self.sigma_noise),
            "the temperature": float(self.temperature),
            "the options": self.options.to_state(),
            "override": override,
            "the previous fit's blocks": None
            if override or self.H is None
            else self.H.block_sizes,
        }

    def _commit_fit(
        self,
        factors: EKFACFactors,
        previous: EKFACDecomposed | None,
        n_outputs: int,
        num_data: int,
    ) -> None:
        """Everything is computed: only now change the object.

        Sets what laplace-torch's ``ParametricLaplace.fit`` sets: the mean, the
        output size (also on the model), ``H``, ``loss`` and ``n_data``.
        """
        mean = self._mean_vector()
        self.mean = mean if self.enable_backprop else mean.detach()
        self.n_outputs = n_outputs
        self.model.output_size = n_outputs
        layout = factors.layout
        if previous is not None and layout.batch_dims is None:
            layout = replace(layout, batch_dims=self._fitted.batch_dims)
        self._fitted = layout
        if previous is None:
            self.H = factors.to_decomposed()
            self._diagonals = {i: factors.eigenvalues[i] for i in factors.corrections}
            self.loss = factors.loss
            self.n_data = num_data
            return
        eigenvectors = list(previous.eigenvectors)
        eigenvalues = [
            old + new for old, new in zip(previous.eigenvalues, factors.eigenvalues)
        ]
        corrections = {}  # a corrected block's eigenvalues in H are D, not diag(R)
        for index, correction in factors.corrections.items():
            eigenvalues[index] = self._diagonals[index] + factors.eigenvalues[index]
            corrections[index] = merged_eigenpairs(
                previous.corrections[index], correction, self.options.correction_rank
            )
        params = self._posterior_params()
        for index, block in factors.dense.items():  # exact: rebuilt, not rotated
            structure = structure_named(self._fitted.blocks[index].structure)
            eigenvectors[index], eigenvalues[index] = structure.merged(
                previous.eigenvectors[index],
                previous.eigenvalues[index],
                block,
                params[index],
                f"{structure.name} block {index}",
            )
        self.H = corrected_matrix(eigenvectors, eigenvalues, corrections)
        self._diagonals = {index: eigenvalues[index] for index in corrections}
        self._fitted = layout.with_corrections(
            {index: U.shape[1] for index, (U, _) in corrections.items()}
        )
        self.loss = self.loss + factors.loss
        self.n_data = self.n_data + num_data

    # ---------------------------------------------------------------- posterior
    @property
    def posterior_precision(self) -> EKFACDecomposed:
        """Posterior precision ``H / (σ² T) + δ`` as an :class:`EKFACDecomposed`.

        The same object while ``H``, the prior, ``σ`` and ``T`` stay the same (and
        need no gradient), so that what it derives once (a low-rank correction's
        Woodbury factor) serves every predictive call.
        """
        self._check_H_init()
        hyperparameters = (self.prior_precision, self.sigma_noise, self.temperature)
        tensors = [t for t in hyperparameters if isinstance(t, Tensor)]
        if any(t.requires_grad for t in tensors):
            return self.H * likelihood_scale(self) + self.prior_precision
        key = (
            self.H,
            *hyperparameters,
            *(tensor_version(t) for t in tensors),
        )
        memo = getattr(self, "_precision_memo", None)
        if memo is not None and _same_key(memo[0], key):
            return memo[1]
        precision = self.H * likelihood_scale(self) + self.prior_precision
        self._precision_memo = (key, precision)
        return precision

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
        """``log det P``, exact from the eigenvalues.

        Before a fit the posterior is the prior, as in laplace-torch's KronLaplace:
        ``log det P₀``.
        """
        if getattr(self, "H", None) is None:
            return self.log_det_prior_precision
        return self.posterior_precision.logdet()

    def square_norm(self, value: Tensor) -> Tensor:
        """``(value - mean)ᵀ P (value - mean)`` (``P₀`` before a fit, as KronLaplace).

        Args:
            value: Shape ``(P,)``.

        Returns:
            Scalar tensor.
        """
        delta = value - self.mean
        if getattr(self, "H", None) is None:
            return (delta * self.prior_precision_diag) @ delta
        return delta @ self.posterior_precision.bmm(delta, exponent=1)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Posterior samples ``θ* + Q diag((λ/(σ²T) + δ)^{-1/2}) z``, ``z ~ N(0, I)``.

        Args:
            n_samples: Number of samples.
            generator: Random generator on the model's device.

        Returns:
            Shape ``(n_samples, P)``, in the model's dtype.
        """
        precision = self.posterior_precision
        z = torch.randn(
            n_samples,
            self.n_params,
            device=model_device(self),
            dtype=precision.dtype,  # float32 for a half-precision model
            generator=generator,
        )
        deviations = precision.eigenbasis_matmul(z, exponent=-0.5)
        return (self.mean.reshape(1, -1) + deviations).to(model_dtype(self))

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
        check_jacobians(self, Js)
        n_batch, n_outs, n_params = Js.shape
        flat = Js.reshape(1, n_batch * n_outs, n_params)
        return self.posterior_precision.inv_square_form(flat).squeeze(0)

    def log_marginal_likelihood(
        self,
        prior_precision: Tensor | None = None,
        sigma_noise: Tensor | None = None,
    ) -> Tensor:
        """laplace-torch's Laplace evidence, refused before a fit.

        ``log p(D) ≈ log p(D|θ*) - ½ (log det P - log det P₀ + (θ*-μ₀)ᵀ P₀ (θ*-μ₀))``,
        differentiable in ``prior_precision`` and ``sigma_noise`` if given.

        Args:
            prior_precision: Replaces the prior precision first, if given.
            sigma_noise: Replaces the observation noise first (regression).

        Returns:
            Scalar tensor, in the model's dtype (computed in float32 for a
            half-precision model).

        Raises:
            ValueError: For ``sigma_noise`` with a likelihood other than regression.
            AttributeError: Before a fit (KronLaplace fails on a shape there).
        """
        if sigma_noise is not None and self.likelihood != Likelihood.REGRESSION:
            raise ValueError("Can only change sigma_noise for regression.")
        self._check_H_init()
        evidence = super().log_marginal_likelihood(prior_precision, sigma_noise)
        return evidence.to(model_dtype(self))

    # -------------------------------------------------------------------- prior
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
        sizes = self._block_sizes()
        prior = self.prior_precision
        if len(prior) == 1:
            return prior * torch.ones(
                sum(sizes), device=prior.device, dtype=prior.dtype
            )
        return torch.repeat_interleave(
            prior, torch.as_tensor(sizes, device=prior.device)
        )

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
        before = self.prior_precision.clone()
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
        ranks = ranks_of(self.process_group)
        chosen = {"the tuned prior precision": self.prior_precision.tolist()}
        try:  # a grid search with a callable loss scores the rank's own loader
            ranks.same(lambda: chosen, "the prior precision")
        except ValueError as error:
            self.prior_precision = before
            raise ValueError(
                f"{error} With a process_group, give every rank the same (whole) "
                "validation loader for method='gridsearch', or tune by marginal "
                "likelihood, which every rank computes alike. The prior is unchanged."
            ) from None

    # --------------------------------------------------------------- predictive
    @torch.enable_grad()
    def _glm_predictive_distribution(
        self,
        X: Tensor | Mapping[str, Any],
        joint: bool = False,
        diagonal_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """GLM predictive mean and variance, Jacobian-free where possible.

        The per-input and the joint covariance are computed block by block in the
        eigenbasis (:mod:`ekfac_laplace.predictive`) without forming the
        ``(batch, outputs, parameters)`` Jacobian. ``enable_backprop=True`` and
        models that reuse a layer within one forward pass take laplace-torch's
        dense-Jacobian path (bounded by ``dense_limit_bytes``). Both are returned
        in the model's dtype; no inputs give empty results.
        """
        self._check_H_init()
        if joint:
            size = batch_size(X, self.dict_key_x) * self.n_outputs
            check_dense_size(
                (size, size),
                model_dtype(self),
                "joint predictive covariance",
                self.dense_limit_bytes,
            )
        if not self.enable_backprop:
            try:
                f_mu, f_var = self._jacobian_free_predictive(X, joint)
            except CaptureError:
                pass  # e.g. a reused module: laplace-torch's Jacobians handle it
            else:
                if diagonal_output and not joint:
                    f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
                return f_mu.to(model_dtype(self)), f_var.to(model_dtype(self))
        check_dense_size(
            (batch_size(X, self.dict_key_x), self.n_outputs, self.n_params),
            model_dtype(self),
            "Jacobian of laplace-torch's predictive (enable_backprop=True or a "
            "reused layer)",
            self.dense_limit_bytes,
        )
        f_mu, f_var = self._dense_glm_predictive_distribution(X, joint, diagonal_output)
        return f_mu.to(model_dtype(self)), f_var.to(model_dtype(self))

    def _dense_glm_predictive_distribution(
        self, X: Tensor | Mapping[str, Any], joint: bool, diagonal_output: bool
    ) -> tuple[Tensor, Tensor]:
        """laplace-torch's GLM predictive with dense Jacobians from the backend."""
        return ParametricLaplace._glm_predictive_distribution(
            self, X, joint=joint, diagonal_output=diagonal_output
        )

    def _sampled_outputs(
        self,
        X: Tensor | Mapping[str, Any],
        n_samples: int,
        generator: torch.Generator | None,
        **model_kwargs: Any,
    ) -> Iterator[Tensor]:
        """The network's outputs at each of ``n_samples`` posterior samples.

        The MAP parameters are back in the model when the loop ends, also when a
        forward pass raises or is interrupted: a sample left in the model would
        shift every later GLM prediction.
        """
        X = to_device(X, model_device(self))
        with parameters_kept(self.params):
            for sample in self.sample(n_samples, generator):
                vector_to_parameters(sample, self.params)
                yield self.model(X, **model_kwargs)

    def _nn_functional_samples(
        self,
        X: Tensor | Mapping[str, Any],
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """laplace-torch's sampled-network outputs, the MAP weights kept safe."""
        outputs = self._sampled_outputs(X, n_samples, generator, **model_kwargs)
        return torch.stack([f if self.enable_backprop else f.detach() for f in outputs])

    def _nn_predictive_classification(
        self,
        X: Tensor | Mapping[str, Any],
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """The samples' class probabilities averaged online, as laplace-torch."""
        probabilities: Tensor | float = 0.0
        for f in self._sampled_outputs(X, n_samples, generator, **model_kwargs):
            probabilities = probabilities + torch.softmax(f.detach(), -1) / n_samples
        return probabilities

    # ------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        """State as plain tensors, numbers, strings, lists and tuples.

        Returns:
            laplace-torch's state with ``H`` as one ``(λ, *eigenvectors)`` tuple per
            block, the EKFAC options under ``"ekfac_options"`` and the fitted
            layout (:class:`~ekfac_laplace.fitted.FittedLayout`, plain) under
            ``"ekfac_layout"``. With a ``correction_rank``, ``H`` holds every
            block's ``diag(R)`` (plain EKFAC) and ``"ekfac_corrections"`` the
            corrected blocks' ``(index, U, S)``.
        """
        state = super().state_dict()
        H = self.H
        if self._diagonals:
            eigenvalues = list(H.eigenvalues)
            for index, diagonal in self._diagonals.items():
                eigenvalues[index] = diagonal
            H = EKFACDecomposed(H.eigenvectors, eigenvalues)
        state["H"] = H.to_state()
        state["ekfac_options"] = self.options.to_state()
        state["ekfac_layout"] = self.fitted_layout.plain()
        if self._diagonals:
            state["ekfac_corrections"] = [
                (index, *self.H.corrections[index]) for index in sorted(self._diagonals)
            ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, validating it first.

        Every block's kind and shapes, its eigenvalues (finite, non-negative) and
        eigenvectors (finite, orthonormal), the mean and every hyperparameter are
        checked against this model before anything changes
        (:func:`~ekfac_laplace.state.checked_state`).

        Args:
            state_dict: A state produced by the same class for the same model.

        Raises:
            KeyError: If the state lacks one of laplace-torch's keys (as
                laplace-torch raises).
            ValueError: If the state is from another class, model or likelihood, is
                not an EKFAC state, or holds invalid values. The object is
                unchanged.
        """
        check_state_header(state_dict, type(self).__name__, self.likelihood)
        params = self._posterior_params()
        checked = checked_state(
            state_dict, self.model, params, self.n_params, self.n_layers
        )
        with restored_on_failure(self, self.model):
            self._apply_state(state_dict, checked)

    def _apply_state(self, state_dict: dict[str, Any], checked: CheckedState) -> None:
        """Set a validated state (laplace-torch's load, with our ``H``)."""
        ParametricLaplace.load_state_dict(self, {**state_dict, "H": checked.curvature})
        self.options = checked.options
        self._fitted = checked.layout
        self._diagonals = checked.diagonals

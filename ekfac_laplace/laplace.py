r"""EKFAC Laplace approximations registered with laplace-torch.

Importing this module registers ``hessian_structure="ekfac"`` with
``laplace.Laplace(...)`` for ``subset_of_weights="all"`` (:class:`EKFACLaplace`) and
``"last_layer"`` (:class:`EKFACLLLaplace`). Both are an
:class:`~ekfac_laplace.posterior.EKFACPosterior`; here they take laplace-torch's
constructor arguments and the EKFAC options.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from laplace.curvature import CurvatureInterface
from laplace.lllaplace import LLLaplace
from laplace.utils.enums import Likelihood
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from typing_extensions import Unpack

from ekfac_laplace._compat import (
    check_laplace_torch,
    find_last_layer,
    model_device,
    model_dtype,
)
from ekfac_laplace.backends import laplace_options
from ekfac_laplace.batches import (
    LaplaceBatches,
    check_inputs,
    check_outputs,
    check_reiterable,
    dataset_size,
    naming_failing_module,
    to_device,
)
from ekfac_laplace.distributed import ranks_of
from ekfac_laplace.hyperparameters import (
    check_finite,
    check_positive_scalar,
    check_prior_precision,
)
from ekfac_laplace.options import EKFACOptions, OptionKeywords, taking_options
from ekfac_laplace.parameters import parameters_kept, parameters_vector
from ekfac_laplace.posterior import EKFACPosterior
from ekfac_laplace.predictive import glm_predictive_variance
from ekfac_laplace.state import check_state_header, checked_state, restored_on_failure

check_laplace_torch()  # the private members our classes read and override


def _checked_options(
    likelihood: Likelihood | str,
    hyperparameters: tuple[float | Tensor, float | Tensor, float, float | Tensor],
    *args: Any,
    **kwargs: Any,
) -> EKFACOptions:
    """A constructor's checks, before anything is set, and its EKFAC options.

    Args:
        likelihood: The Laplace object's likelihood.
        hyperparameters: Its initial ``(prior_precision, sigma_noise, temperature,
            prior_mean)``.
        *args: The backend arguments of :func:`~ekfac_laplace.backends.laplace_options`.
        **kwargs: Its EKFAC keywords.

    Returns:
        The options.

    Raises:
        ValueError: For an unsupported likelihood, backend or option, or a bad
            hyperparameter.
    """
    if likelihood not in tuple(Likelihood):
        raise ValueError(
            f"Invalid likelihood type {likelihood!r}; EKFAC Laplace supports "
            f"{', '.join(repr(member.value) for member in Likelihood)}."
        )
    options = laplace_options(*args, **kwargs)
    prior_precision, sigma_noise, temperature, prior_mean = hyperparameters
    check_prior_precision(prior_precision)
    check_positive_scalar("sigma_noise", sigma_noise)
    check_positive_scalar("temperature", temperature)
    check_finite("prior_mean", prior_mean)
    return options


class EKFACLaplace(EKFACPosterior):
    r"""Laplace approximation with an EKFAC posterior precision over all weights.

    The posterior precision of each parameter tensor ``b`` is

    $$
        P_b = (Q_G \otimes Q_A) \, \mathrm{diag}\big(λ_b / (σ^2 T) + δ_b\big) \,
        (Q_G \otimes Q_A)^\top
    $$

    (see :class:`EKFACPosterior`); parameters KFAC cannot factorise get the identity
    basis and the exact diagonal of the curvature.

    Args:
        model: The MAP network. Parameters (``requires_grad=True``) of the layers
            of a Kronecker kind (:mod:`ekfac_laplace.kinds`: ``nn.Linear``,
            convolutions, transposed convolutions, ...) get Kronecker-factored
            eigenbases; those of other modules (norm layers, embeddings, grouped
            convolutions, ...) diagonal blocks, the exact GGN / Fisher diagonal
            (see ``unsupported_layers``).
        likelihood: ``"classification"``, ``"regression"`` or
            ``"reward_modeling"`` (fitted as classification over pairs, predicted
            as regression, as laplace-torch).
        sigma_noise: Observation noise (regression only).
        prior_precision: Scalar or one value per parameter tensor.
        prior_mean: Scalar or one value per parameter.
        temperature: Likelihood temperature.
        enable_backprop: Allow gradients through the predictive w.r.t. the input.
        dict_key_x: Input key of dict-like batches.
        dict_key_y: Target key of dict-like batches.
        backend: Any laplace-torch GGN backend (``CurvlinopsGGN``, the default,
            ``AsdlGGN``, ``BackPackGGN``; ``backend_kwargs={"stochastic": True}``
            for the Monte-Carlo Fisher) or EF backend (``CurvlinopsEF``,
            ``AsdlEF``, ``BackPackEF``: empirical Fisher). EKFAC is computed by
            our engine whichever it is.
        backend_kwargs: Passed to the backend, which computes the dense Jacobians of
            laplace-torch's predictive where ours does not apply.
        asdl_fisher_kwargs: For compatibility with ``KronLaplace``: may carry
            ``mc_samples`` (or ``n_mc_samples``), ``kfac_approx`` and ``seed``.
        process_group: A ``torch.distributed`` process group for a data-parallel
            fit (``torch.distributed.group.WORLD`` or a subgroup): each rank fits
            the loader of its shard and every rank gets the posterior of the union
            of the shards. ``None`` (default): one process.
        **options: The keywords of :class:`~ekfac_laplace.EKFACOptions` (all but
            ``fisher_type``, which the backend decides: ``kfac_approx``,
            ``engine``, ``unsupported_layers``, ...), with its defaults;
            together they become ``la.options``. ``help(EKFACLaplace)`` shows
            each with its description.

    Raises:
        ValueError: For an unsupported likelihood, backend, option or
            hyperparameter, before anything is set.
    """

    _key = ("all", "ekfac")

    @taking_options
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
        process_group: Any | None = None,
        **options: Unpack[OptionKeywords],
    ) -> None:
        self.process_group = process_group
        self.options = _checked_options(
            likelihood,
            (prior_precision, sigma_noise, temperature, prior_mean),
            backend,
            backend_kwargs,
            asdl_fisher_kwargs,
            **options,
        )
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


class ReducedFeatures:
    """Batches ``(φ(X), y)``: the last layer's input, reduced as laplace-torch does.

    Args:
        extractor: laplace-torch's ``FeatureExtractor`` with a ``feature_reduction``.
        batches: The training batches.
    """

    def __init__(self, extractor: nn.Module, batches: LaplaceBatches) -> None:
        self.extractor = extractor
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = next(self.extractor.parameters()).device
        for X, y in self.batches:
            with torch.no_grad():
                f, features = self.extractor.forward_with_features(to_device(X, device))
            yield features.reshape(len(f), -1), y

    def first(self) -> tuple[Tensor, Tensor]:
        """The first batch (see :meth:`LaplaceBatches.first`)."""
        self.batches.first()
        return next(iter(self))


class EKFACLLLaplace(LLLaplace, EKFACPosterior):
    r"""Last-layer Laplace approximation with an EKFAC posterior precision.

    Only the parameters of the last ``nn.Linear`` layer are treated
    probabilistically; the posterior precision of its weight and bias blocks is

    $$
        P_b = (Q_G \otimes Q_A) \, \mathrm{diag}\big(λ_b / (σ^2 T) + δ_b\big) \,
        (Q_G \otimes Q_A)^\top .
    $$

    laplace-torch's ``LLLaplace`` comes first in the method order: its ``__init__``
    wraps the model in a feature extractor and its ``fit`` finds the last layer,
    then runs :meth:`EKFACPosterior.fit`. Unlike laplace-torch's last-layer
    classes, a per-layer prior (one value for the weight, one for the bias) is
    supported. ``fit(override=False)`` is refused, as in laplace-torch.

    Args:
        model: The MAP network.
        likelihood: ``"classification"``, ``"regression"`` or
            ``"reward_modeling"``.
        sigma_noise: Observation noise (regression only).
        prior_precision: Scalar or one value per last-layer parameter tensor.
        prior_mean: Scalar or one value per last-layer parameter.
        temperature: Likelihood temperature.
        enable_backprop: Allow gradients through the predictive w.r.t. the input.
        feature_reduction: How laplace-torch reduces >2-D features.
        dict_key_x: Input key of dict-like batches.
        dict_key_y: Target key of dict-like batches.
        backend: Any laplace-torch GGN or EF backend (see :class:`EKFACLaplace`).
        last_layer_name: Name of the last layer; found automatically if ``None``.
        backend_kwargs: Passed to the backend.
        asdl_fisher_kwargs: Not supported for last-layer Laplace (laplace-torch).
        process_group: A ``torch.distributed`` process group for a data-parallel
            fit (see :class:`EKFACLaplace`).
        **options: The keywords of :class:`~ekfac_laplace.EKFACOptions`, as for
            :class:`EKFACLaplace` (``max_factor_size`` for a large vocabulary).

    Raises:
        ValueError: For an unsupported likelihood, backend, option or
            hyperparameter, before anything is set.
    """

    _key = ("last_layer", "ekfac")

    @taking_options
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
        process_group: Any | None = None,
        **options: Unpack[OptionKeywords],
    ) -> None:
        self.process_group = process_group
        # laplace-torch's LLLaplace refuses asdl_fisher_kwargs itself.
        self.options = _checked_options(
            likelihood,
            (prior_precision, sigma_noise, temperature, prior_mean),
            backend,
            backend_kwargs,
            **options,
        )
        super().__init__(
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

    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
    ) -> None:
        """Find the last layer (laplace-torch's ``LLLaplace.fit``), then fit EKFAC.

        The loader's first batch is checked before laplace-torch runs the model on
        it: an empty loader or inputs of another dtype than the model's raise a
        ``ValueError`` (laplace-torch would raise ``StopIteration`` or torch's
        error), and a ``RuntimeError`` of the forward pass names the module.

        Args:
            train_loader: Batches ``(X, y)`` or dict-like batches.
            override: Must be ``True`` (laplace-torch refuses ``False`` for
                last-layer Laplace).
            progress_bar: Show a progress bar over each pass.

        Raises:
            ValueError: For ``override=False``, an empty loader, inputs of another
                dtype, or what :meth:`EKFACPosterior.fit` refuses.
        """
        if override:
            ranks = ranks_of(self.process_group)
            ranks.run(
                lambda: self._check_first_batch(train_loader, shard=ranks.size > 1),
                "finding the last layer",
            )
        with naming_failing_module(self.model.model):  # the user's module names
            LLLaplace.fit(self, train_loader, override, progress_bar)

    def _check_first_batch(self, train_loader: DataLoader, shard: bool) -> None:
        """This rank's loader and first batch, before laplace-torch uses them."""
        check_reiterable(train_loader)
        dataset_size(train_loader, shard=shard)
        batches = LaplaceBatches(train_loader, self.dict_key_y, self.dict_key_x)
        X, _ = batches.first()
        check_inputs(X, model_dtype(self), self.dict_key_x)
        with naming_failing_module(self.model.model), torch.no_grad():
            check_outputs(self.model.model(to_device(X, model_device(self))))

    def state_dict(self) -> dict[str, Any]:
        """laplace-torch's last-layer state, without training data.

        Returns:
            The state of :meth:`EKFACPosterior.state_dict` with the last layer's
            name under ``"_last_layer_name"`` and ``"data"`` set to ``None``
            (laplace-torch stores the first training batch there, to find the last
            layer again; the name is enough).
        """
        state = EKFACPosterior.state_dict(self)
        state["_last_layer_name"] = self._last_layer_path()
        state["data"] = None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state, validated against the model before anything changes.

        The last layer is the one the state names (or, for a state that holds a
        first training batch instead, the one laplace-torch finds with it).

        Args:
            state_dict: A state from :meth:`state_dict` for the same model.

        Raises:
            KeyError: If a key is missing.
            ValueError: If the state is from another class, model or likelihood,
                names another last layer, or holds invalid values. The object is
                unchanged.
        """
        check_state_header(
            state_dict, type(self).__name__, self.likelihood, ("_last_layer_name",)
        )
        name = self._state_last_layer(state_dict)
        layer = self.model.model.get_submodule(name)
        params = [p for p in layer.parameters() if p.requires_grad]
        n_layers = len(list(layer.parameters()))
        checked = checked_state(
            state_dict,
            self.model.model,
            params,
            sum(p.numel() for p in layer.parameters()),
            n_layers,
            mean_params=list(layer.parameters()),
        )
        with restored_on_failure(self, self.model):
            if self.model.last_layer is None:
                self.model.set_last_layer(name)
            self.n_params = sum(p.numel() for p in layer.parameters())
            self.n_layers = n_layers
            self._apply_state({**state_dict, "data": None}, checked)

    def _state_last_layer(self, state_dict: dict[str, Any]) -> str:
        """The name of the last layer a state is for, checked against the model."""
        name = state_dict["_last_layer_name"]
        if self.model.last_layer is not None:
            known = self._last_layer_path()
            if name is not None and name != known:
                raise ValueError(
                    f"The state is for the last layer {name!r}, but this model's "
                    f"last layer is {known!r}."
                )
            return known
        if name is None and state_dict.get("data") is not None:
            # A state from ekfac_laplace 0.2 or laplace-torch: a first batch.
            find_last_layer(self, state_dict["data"])
            return self._last_layer_path()
        modules = dict(self.model.model.named_modules())
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(
                f"The state names the last layer {name!r}, which is not an "
                "nn.Linear of this model; load it into the model it was fitted on, "
                "or pass last_layer_name."
            )
        return name

    def _last_layer_path(self) -> str:
        """The last layer's name in the network."""
        last_layer = self._last_layer()
        return next(
            name
            for name, module in self.model.model.named_modules()
            if module is last_layer
        )

    def _posterior_params(self) -> list[Tensor]:
        return [p for p in self._last_layer().parameters() if p.requires_grad]

    def _mean_vector(self) -> Tensor:
        return parameters_vector(self._last_layer().parameters())

    def _last_layer(self) -> nn.Module:
        """The last layer; before a fit without ``last_layer_name`` it is unknown."""
        last_layer = self.model.last_layer
        if last_layer is None:
            raise AttributeError(
                f"{type(self).__name__} is not fitted: call .fit(train_loader) first "
                "(it finds the last layer), or pass last_layer_name."
            )
        return last_layer

    def _curvature_model(self, batches: LaplaceBatches) -> tuple[nn.Module, Any]:
        """With ``feature_reduction``: the last layer on the reduced features.

        laplace-torch's last-layer model is then ``f = W φ(x) + b`` with ``φ`` the
        last layer's input reduced over its middle dimensions (``pick_first``,
        ``pick_last``, ``average``), as its Jacobians ``φ ⊗ I`` say; the fit takes
        the curvature of that model. Without it, the curvature of the network
        itself (the last layer at every position it is applied to).
        """
        if self.model.feature_reduction is None:
            return self.model, batches
        return self._last_layer(), ReducedFeatures(self.model, batches)

    def _jacobian_free_predictive(
        self, X: Tensor | Mapping[str, Any], joint: bool
    ) -> tuple[Tensor, Tensor]:
        """The GLM predictive; with ``feature_reduction`` on the reduced features.

        The mean is the network's output and the variance that of the last layer
        on the reduced features, as laplace-torch's Jacobians ``φ ⊗ I`` give it.
        """
        if self.model.feature_reduction is None:
            return EKFACPosterior._jacobian_free_predictive(self, X, joint)
        with torch.no_grad():
            f, features = self.model.forward_with_features(
                to_device(X, model_device(self))
            )
        _, f_var = glm_predictive_variance(
            self._last_layer(),
            self._posterior_params(),
            self.posterior_precision,
            features.reshape(len(f), -1),
            self.fitted_layout,
            joint=joint,
        )
        return (f.flatten() if joint else f), f_var

    # LLLaplace precedes EKFACPosterior in the method order; where it defines a member
    # for its own structures, ours is chosen explicitly.
    prior_precision_diag = EKFACPosterior.prior_precision_diag
    _glm_predictive_distribution = EKFACPosterior._glm_predictive_distribution

    def _dense_glm_predictive_distribution(
        self, X: Tensor | Mapping[str, Any], joint: bool, diagonal_output: bool
    ) -> tuple[Tensor, Tensor]:
        """laplace-torch's last-layer GLM predictive (last-layer Jacobians).

        Asked for the full output covariance: for ``diagonal_output`` it would call
        :meth:`functional_variance_fast`, which comes back here.
        """
        f_mu, f_var = LLLaplace._glm_predictive_distribution(self, X, joint=joint)
        if diagonal_output and not joint:
            f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
        return f_mu, f_var

    def functional_variance_fast(
        self, X: Tensor | Mapping[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """GLM predictive mean and output variances, ``(B, K)`` each.

        laplace-torch's hook for a structure with a fast diagonal predictive
        (``KronLLLaplace`` raises ``NotImplementedError``): ours is the
        Jacobian-free predictive in the eigenbasis.

        Args:
            X: A batch of inputs.

        Returns:
            ``f_mu`` and the diagonal of ``J P⁻¹ Jᵀ`` per input.
        """
        return self._glm_predictive_distribution(X, joint=False, diagonal_output=True)

    def _nn_predictive_samples(
        self,
        X: Tensor | Mapping[str, Any],
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """Last-layer NN samples, through :meth:`_nn_functional_samples`.

        laplace-torch 0.3's own calls ``X.to`` (dict batches fail) and reruns only
        the last layer on features of any shape.
        """
        samples = self._nn_functional_samples(X, n_samples, generator, **model_kwargs)
        if self.likelihood == Likelihood.CLASSIFICATION:
            samples = torch.softmax(samples, dim=-1)
        return samples

    def _nn_predictive_classification(
        self,
        X: Tensor | Mapping[str, Any],
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """The Monte-Carlo average of the NN samples' class probabilities."""
        samples = self._nn_functional_samples(X, n_samples, generator, **model_kwargs)
        return torch.softmax(samples.detach(), dim=-1).mean(0)

    def _nn_functional_samples(
        self,
        X: Tensor | Mapping[str, Any],
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """Last-layer NN samples (laplace-torch 0.3 writes them into all weights).

        Features are computed once; each sample only reruns the last layer. Where
        the last layer sees several positions per input and no
        ``feature_reduction`` says how to reduce them, each sample reruns the
        network (the last layer alone would not give the outputs).
        """
        last_layer = self._last_layer()
        X = to_device(X, model_device(self))
        outputs, features = [], None
        with parameters_kept(last_layer.parameters()):
            for sample in self.sample(n_samples, generator):
                vector_to_parameters(sample, last_layer.parameters())
                if features is None:
                    f, features = self.model.forward_with_features(X, **model_kwargs)
                    if features.ndim > 2 and self.model.feature_reduction is None:
                        features = None  # a whole forward pass per sample
                else:
                    f = last_layer(features)
                outputs.append(f if self.enable_backprop else f.detach())
        return torch.stack(outputs)

"""Computing EKFAC factors over a whole data set with curvlinops.

The eigenvalue correction needs the *final* Kronecker eigenbasis, so EKFAC cannot be
summed batch by batch the way laplace-torch sums ``Kron`` factors. Instead we make
two passes over the training loader with curvlinops' ``EKFACLinearOperator``: the
first accumulates the Kronecker factors ``A = Σ a aᵀ`` and ``G = Σ g gᵀ`` (whose
eigenvectors give ``Q_A`` and ``Q_G``), the second accumulates the corrected
eigenvalues ``λ = Σ_n Σ_c (Q_Gᵀ G_{n,c} Q_A)²`` from the per-example (pseudo-)gradients
``G_{n,c}``.

Scale follows laplace-torch: the curvature is the sum over all ``N`` training points
of the Hessian/GGN/Fisher of the log likelihood. For regression the loss is
``MSELoss(reduction="sum")`` times ``1/2`` (a Gaussian with unit variance); σ and the
temperature enter later through ``1 / (σ² T)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from curvlinops import EKFACLinearOperator, FisherType
from torch import Tensor, nn

from ekfac_laplace import _compat
from ekfac_laplace.diagonal import check_diagonal_module
from ekfac_laplace.engine import DEFAULT_CACHE_BUDGET_BYTES, fast_ekfac
from ekfac_laplace.matrix import EKFACDecomposed

FISHER_TYPES = ("type2", "mc", "empirical")
_CURVLINOPS_FISHER_TYPES = {
    "type2": FisherType.TYPE2,
    "mc": FisherType.MC,
    "empirical": FisherType.EMPIRICAL,
}
KFAC_APPROXIMATIONS = ("expand", "reduce")
DEFAULT_SEED = 2147483647
ENGINES = ("fast", "curvlinops")
UNSUPPORTED_LAYERS = ("diagonal", "raise")


@dataclass
class EKFACFactors:
    """EKFAC of the log-likelihood curvature, in laplace-torch's scale.

    Attributes:
        eigenvectors: Per parameter tensor, ``(Q_G, Q_A)`` (weight) or ``(Q_G,)``
            (bias).
        eigenvalues: Per parameter tensor, corrected eigenvalues (``(out, in)`` or
            ``(out,)``), summed over the data set and clamped at zero.
        loss: The data term ``factor * Σ_n loss(f(x_n), y_n)`` that laplace-torch
            stores as ``Laplace.loss``.
    """

    eigenvectors: list[tuple[Tensor, ...]]
    eigenvalues: list[Tensor]
    loss: Tensor

    def to_decomposed(self) -> EKFACDecomposed:
        """The curvature as an :class:`EKFACDecomposed` with zero deltas."""
        return EKFACDecomposed(self.eigenvectors, self.eigenvalues)


def likelihood_loss(likelihood: str) -> tuple[nn.Module, float]:
    """laplace-torch's loss and factor for a likelihood.

    Args:
        likelihood: ``"classification"`` or ``"regression"``.

    Returns:
        The summed loss and the factor converting it to a negative log likelihood.

    Raises:
        ValueError: For another likelihood.
    """
    if likelihood == "classification":
        return nn.CrossEntropyLoss(reduction="sum"), 1.0
    if likelihood == "regression":
        return nn.MSELoss(reduction="sum"), 0.5
    raise ValueError(
        f"EKFAC supports the likelihoods 'classification' and 'regression', got "
        f"{likelihood!r}."
    )


class LaplaceBatches:
    """Re-iterable view of a laplace-torch training loader as ``(X, y)`` pairs.

    Dict-like batches (Hugging Face style) yield ``(batch, batch[dict_key_y])`` and are
    passed to the model whole, as laplace-torch does. The most recent targets are
    kept in :attr:`current_targets` so that a forward hook can compute the loss.

    Args:
        loader: Iterable of ``(X, y)`` tuples or of dict-like batches.
        dict_key_y: Key of the targets in dict-like batches.
    """

    def __init__(self, loader: Iterable[Any], dict_key_y: str = "labels") -> None:
        self.loader = loader
        self.dict_key_y = dict_key_y
        self.current_targets: Tensor | None = None

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for batch in self.loader:
            if isinstance(batch, MutableMapping):
                if self.dict_key_y not in batch:
                    raise ValueError(
                        f"A dict-like batch has no targets under dict_key_y="
                        f"{self.dict_key_y!r}; its keys are {sorted(batch)}."
                    )
                X, y = batch, batch[self.dict_key_y]
            else:
                X, y = batch
            self.current_targets = y
            yield X, y

    def batch_size_fn(self, dict_key_x: str) -> Callable[[Any], int] | None:
        """A ``batch_size_fn`` for curvlinops when batches are dict-like.

        Args:
            dict_key_x: Key of the inputs in dict-like batches.

        Returns:
            ``None`` for tensor inputs, else a function reading the batch size.
        """
        first = next(iter(self.loader))
        if isinstance(first, MutableMapping):
            return lambda X: X[dict_key_x].shape[0]
        return None


class Located(NamedTuple):
    """Where a parameter lives and which kind of block it gets.

    Attributes:
        module: Name of the owning module in the model.
        name: Name of the parameter in that module (``"weight"``, ``"bias"``, ...).
        diagonal: ``True`` for a diagonal block (EKFAC in the identity basis), for
            parameters of modules KFAC cannot factorise.
    """

    module: str
    name: str
    diagonal: bool


def kfac_supported(module: nn.Module) -> bool:
    """Whether KFAC factorises the curvature of ``module``'s parameters.

    Args:
        module: Any module.

    Returns:
        ``True`` for ``nn.Linear`` and for ``nn.Conv2d`` with ``groups=1`` and zero
        padding.
    """
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def _owning_modules(
    model: nn.Module, params: list[Tensor], unsupported_layers: str = "diagonal"
) -> list[Located]:
    """Module and parameter names of each parameter, and its kind of block.

    Parameters of ``nn.Linear`` / ``nn.Conv2d`` (``groups=1``, zero padding) get
    Kronecker-factored blocks; all others a diagonal block, or an error with
    ``unsupported_layers="raise"`` (validated by :func:`_validate_options`).
    """
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            entries = owners.setdefault(id(param), [])
            if all(entry[2] is not module for entry in entries):
                entries.append((module_name, param_name, module))
    located = []
    for param in params:
        if id(param) not in owners:
            raise ValueError(
                f"A parameter of shape {tuple(param.shape)} is not a parameter of the "
                "model; pass the model's own parameters."
            )
        entries = owners[id(param)]
        if len(entries) > 1:
            names = [f"{name}.{param_name}" for name, param_name, _ in entries]
            raise ValueError(
                f"The parameter {names[0]} is shared by several modules ({names}: "
                "weight tying), so its curvature mixes their factors. Untie the "
                "weights, or freeze the shared parameter with requires_grad_(False)."
            )
        module_name, param_name, module = entries[0]
        if kfac_supported(module):
            located.append(Located(module_name, param_name, False))
            continue
        if unsupported_layers == "raise":
            reason = (
                f"groups={module.groups}"
                if isinstance(module, nn.Conv2d) and module.groups != 1
                else f"padding_mode={module.padding_mode!r}"
                if isinstance(module, nn.Conv2d)
                else f"a {type(module).__name__}"
            )
            raise ValueError(
                f"Parameter '{module_name}.{param_name}' belongs to {reason}, which "
                "KFAC cannot factorise (supported: nn.Linear, nn.Conv2d with groups=1 "
                "and zero padding). Use unsupported_layers='diagonal' (the default) "
                "for an exact diagonal block, freeze it with requires_grad_(False), "
                "or use subset_of_weights='last_layer'."
            )
        check_diagonal_module(module_name, module)
        located.append(Located(module_name, param_name, True))
    return located


def _validate_options(
    fisher_type: str,
    kfac_approx: str,
    mc_samples: int,
    unsupported_layers: str = "diagonal",
) -> None:
    if unsupported_layers not in UNSUPPORTED_LAYERS:
        raise ValueError(
            f"Unknown unsupported_layers {unsupported_layers!r}; choose one of "
            f"{UNSUPPORTED_LAYERS}."
        )
    if fisher_type not in FISHER_TYPES:
        raise ValueError(
            f"Unknown fisher_type {fisher_type!r}; choose one of {FISHER_TYPES}."
        )
    if kfac_approx not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"Unknown kfac_approx {kfac_approx!r}; choose one of {KFAC_APPROXIMATIONS}."
        )
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
    if mc_samples != 1 and fisher_type != "mc":
        raise ValueError(
            f"mc_samples={mc_samples} only applies to fisher_type='mc'; "
            f"with fisher_type={fisher_type!r} use mc_samples=1."
        )


def _check_finite_factors(state: dict[str, Any]) -> None:
    for key, kind in (
        ("input_covariances", "input"),
        ("gradient_covariances", "gradient"),
    ):
        for module_name, factor in state[key].items():
            if not torch.isfinite(factor).all():
                raise ValueError(
                    f"The Kronecker {kind} factor of layer '{module_name}' is not "
                    "finite (NaN or Inf); check the model's outputs and the data for "
                    "NaN/Inf."
                )


@contextmanager
def _removing_leftover_hooks(model: nn.Module) -> Iterator[None]:
    """Remove module hooks that a failing curvlinops pass leaves behind.

    curvlinops installs forward hooks for each pass and removes them only when the
    pass completes; an exception in between (bad targets, NaN, a reused layer) would
    otherwise leave the user's model instrumented.
    """
    registries = ("_forward_hooks", "_forward_pre_hooks")
    before = {
        (id(module), registry): set(getattr(module, registry))
        for module in model.modules()
        for registry in registries
    }
    try:
        yield
    except BaseException:
        for module in model.modules():
            for registry in registries:
                hooks = getattr(module, registry)
                for key in set(hooks) - before.get((id(module), registry), set()):
                    del hooks[key]
        raise


@torch.no_grad()
def _refuse_reused_modules(
    model: nn.Module, located: list[Located], batches: LaplaceBatches
) -> None:
    """One forward pass on the first batch, refusing layers that run twice."""
    calls: dict[str, int] = {}

    def count_call(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            calls[name] = calls.get(name, 0) + 1

        return hook

    handles = [
        model.get_submodule(name).register_forward_pre_hook(count_call(name))
        for name in {entry.module for entry in located}
    ]
    try:
        X, _ = next(iter(batches))
        device = next(model.parameters()).device
        model(X.to(device) if isinstance(X, Tensor) else X)
    finally:
        for handle in handles:
            handle.remove()
    for name, count in calls.items():
        if count > 1:
            raise ValueError(
                f"Module '{name}' runs more than once per forward pass (a reused or "
                "tied layer); EKFAC cannot factorise its curvature. Use a separate "
                "module per use, or freeze it with requires_grad_(False)."
            )


def compute_ekfac(
    model: nn.Module,
    params: list[Tensor],
    batches: LaplaceBatches,
    likelihood: str,
    num_data: int,
    *,
    fisher_type: str = "type2",
    kfac_approx: str = "expand",
    mc_samples: int = 1,
    seed: int = DEFAULT_SEED,
    dict_key_x: str = "input_ids",
    eigenbasis: list[tuple[Tensor, ...]] | None = None,
    progress_bar: bool = False,
    engine: str = "fast",
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
    unsupported_layers: str = "diagonal",
) -> EKFACFactors:
    """EKFAC of the log-likelihood GGN / Fisher of ``model`` over a whole data set.

    Args:
        model: The network. Parameters of ``nn.Linear`` / ``nn.Conv2d`` get
            Kronecker-factored eigenbases; all others diagonal blocks (see
            ``unsupported_layers``).
        params: Parameters to approximate the curvature for, in vector order.
        batches: The training data.
        likelihood: ``"classification"`` or ``"regression"``.
        num_data: Number of training points ``N``.
        fisher_type: ``"type2"`` (exact GGN), ``"mc"`` (Monte-Carlo Fisher) or
            ``"empirical"`` (empirical Fisher).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers.
        mc_samples: Labels drawn per example for ``fisher_type="mc"``.
        seed: Seed of the label sampler; both passes draw the same labels.
        dict_key_x: Key of the inputs in dict-like batches.
        eigenbasis: If given, skip the Kronecker-factor pass and compute the corrected
            eigenvalues in this basis (online fitting).
        progress_bar: Show tqdm progress bars over both passes.
        engine: ``"fast"`` (default, :mod:`ekfac_laplace.engine`: closed-form loss
            Hessian roots and a cached correction) or ``"curvlinops"`` (curvlinops'
            ``EKFACLinearOperator``, two passes). Both compute the same matrix.
        cache_budget_bytes: For ``engine="fast"``: bytes of layer inputs and output
            gradients that may be kept from the first pass to skip the second
            (default 64 MiB, projected from the first batch; ``0``: always two
            passes).
        unsupported_layers: ``"diagonal"`` (default): parameters of other modules
            (norm layers, embeddings, grouped convolutions, ...) get the exact
            diagonal of the GGN / Fisher, i.e. EKFAC in the identity basis
            (eigenvectors ``()``, eigenvalues shaped like the parameter; fast engine
            only). ``"raise"``: refuse them.

    Returns:
        The eigenbasis, the corrected eigenvalues and the summed loss.

    Raises:
        ValueError: For unsupported options, layers, or non-finite curvature.
    """
    _validate_options(fisher_type, kfac_approx, mc_samples, unsupported_layers)
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; choose one of {ENGINES}.")
    loss_function, factor = likelihood_loss(likelihood)
    located = _owning_modules(model, params, unsupported_layers)
    if engine == "curvlinops" and any(entry.diagonal for entry in located):
        entry = next(entry for entry in located if entry.diagonal)
        raise ValueError(
            f"engine='curvlinops' supports only nn.Linear and nn.Conv2d, but "
            f"'{entry.module}.{entry.name}' needs a diagonal block; use "
            "engine='fast' (the default)."
        )
    if eigenbasis is not None and len(eigenbasis) != len(params):
        raise ValueError(
            f"The eigenbasis has {len(eigenbasis)} blocks but there are {len(params)} "
            "parameter tensors."
        )
    if engine == "fast":
        eigenvectors, raw_eigenvalues, total_loss = fast_ekfac(
            model,
            list(params),
            located,
            batches,
            likelihood,
            num_data,
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            mc_samples=mc_samples,
            seed=seed,
            eigenbasis=eigenbasis,
            cache_budget_bytes=cache_budget_bytes,
            progress_bar=progress_bar,
        )
    else:
        eigenvectors, raw_eigenvalues, total_loss = _curvlinops_ekfac(
            model,
            params,
            located,
            batches,
            loss_function,
            num_data,
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            mc_samples=mc_samples,
            seed=seed,
            dict_key_x=dict_key_x,
            eigenbasis=eigenbasis,
            progress_bar=progress_bar,
        )
    eigenvalues = []
    for entry, values in zip(located, raw_eigenvalues):
        if not torch.isfinite(values).all():
            raise ValueError(
                f"The curvature of '{entry.module}.{entry.name}' is not finite (NaN or "
                "Inf); check the model's outputs and the data for NaN/Inf."
            )
        eigenvalues.append(values.mul(factor).clamp_min(0.0))
    return EKFACFactors(eigenvectors, eigenvalues, factor * total_loss)


def _curvlinops_ekfac(
    model: nn.Module,
    params: list[Tensor],
    located: list[Located],
    batches: LaplaceBatches,
    loss_function: nn.Module,
    num_data: int,
    *,
    fisher_type: str,
    kfac_approx: str,
    mc_samples: int,
    seed: int,
    dict_key_x: str,
    eigenbasis: list[tuple[Tensor, ...]] | None,
    progress_bar: bool,
) -> tuple[list[tuple[Tensor, ...]], list[Tensor], Tensor]:
    """EKFAC through curvlinops' ``EKFACLinearOperator`` (loss scale)."""
    _refuse_reused_modules(model, located, batches)
    operator = EKFACLinearOperator(
        model,
        loss_function,
        list(params),
        batches,
        progressbar=progress_bar,
        check_deterministic=False,
        seed=seed,
        fisher_type=_CURVLINOPS_FISHER_TYPES[fisher_type],
        mc_samples=mc_samples,
        kfac_approx=kfac_approx,
        num_per_example_loss_terms=1,
        separate_weight_and_bias=True,
        num_data=num_data,
        batch_size_fn=batches.batch_size_fn(dict_key_x),
    )
    mapping = EKFACLinearOperator.compute_parameter_mapping(list(params), model)

    if eigenbasis is None:
        with _removing_leftover_hooks(model):
            operator.compute_kronecker_factors()
        _check_finite_factors(operator.state_dict())
    else:
        input_eigenvectors, gradient_eigenvectors = {}, {}
        for (module_name, param_name, _), basis in zip(located, eigenbasis):
            gradient_eigenvectors[module_name] = basis[0]
            if param_name == "weight":
                input_eigenvectors[module_name] = basis[1]
        _compat.set_kronecker_eigenbasis(
            operator, input_eigenvectors, gradient_eigenvectors
        )

    total_loss = torch.zeros((), dtype=params[0].dtype, device=params[0].device)

    def accumulate_loss(_: nn.Module, __: Any, output: Tensor) -> None:
        nonlocal total_loss
        targets = batches.current_targets.to(output.device)
        total_loss = total_loss + loss_function(output.detach(), targets)

    try:
        with _removing_leftover_hooks(model):
            handle = model.register_forward_hook(accumulate_loss)
            try:
                operator.compute_eigenvalue_correction()
            finally:
                handle.remove()
    finally:
        batches.current_targets = None

    state = operator.state_dict()
    eigenvectors: list[tuple[Tensor, ...]] = []
    eigenvalues: list[Tensor] = []
    for index, ((module_name, param_name, _), param) in enumerate(zip(located, params)):
        position = mapping[module_name][param_name]
        assert position == index
        q_g = state["gradient_covariances_eigenvectors"][module_name]
        values = state["corrected_eigenvalues"][module_name][position]
        if param_name == "weight":
            q_a = state["input_covariances_eigenvectors"][module_name]
            eigenvectors.append((q_g, q_a))
            values = values.reshape(param.shape[0], -1)
        else:
            eigenvectors.append((q_g,))
        eigenvalues.append(values)
    return eigenvectors, eigenvalues, total_loss

"""EKFAC through curvlinops' ``EKFACLinearOperator``: the reference engine.

Two passes over the data with curvlinops' public API: ``compute_kronecker_factors()``
accumulates ``A`` and ``G``, ``compute_eigenvalue_correction()`` the corrected
eigenvalues in their eigenbasis. Online fitting fixes the eigenbasis first through
:func:`ekfac_laplace._compat.set_kronecker_eigenbasis`. curvlinops supports
``nn.Linear`` and ``nn.Conv2d`` only, so diagonal blocks are refused before a pass.
Results are in the scale of the summed torch loss, like :mod:`ekfac_laplace.engine`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from curvlinops import EKFACLinearOperator
from curvlinops import FisherType as CurvlinopsFisherType
from laplace.utils.enums import Likelihood
from torch import Tensor, nn

from ekfac_laplace import _compat
from ekfac_laplace.batches import LaplaceBatches, batch_size, to_device
from ekfac_laplace.capture import ForwardCapture
from ekfac_laplace.factors import EKFACFactors, likelihood_loss
from ekfac_laplace.layout import ParameterLayout
from ekfac_laplace.options import EKFACOptions, FisherType

_FISHER_TYPES = {
    FisherType.TYPE2: CurvlinopsFisherType.TYPE2,
    FisherType.MC: CurvlinopsFisherType.MC,
    FisherType.EMPIRICAL: CurvlinopsFisherType.EMPIRICAL,
}


def check_curvlinops_layout(layout: ParameterLayout) -> None:
    """Refuse layouts with diagonal blocks, which curvlinops cannot compute.

    Args:
        layout: The parameter layout.

    Raises:
        ValueError: If a parameter needs a diagonal block, or a layer is not an
            ``nn.Linear`` / ``nn.Conv2d`` (attention projections, GPT-2's
            ``Conv1D``).
    """
    if layout.has_dense:
        block = layout.blocks[min(layout.dense)]
        raise ValueError(
            f"engine='curvlinops' computes no exact blocks, but "
            f"'{block.module}.{block.name}' gets one (dense_blocks_up_to); use "
            "engine='fast' (the default)."
        )
    block = layout.first_diagonal()
    if block is not None:
        owner = layout.owners[layout.blocks.index(block)]
        reason = layout.demoted.get(owner.name)
        why = f": a {type(owner.module).__name__} that {reason}" if reason else ""
        raise ValueError(
            f"engine='curvlinops' supports only nn.Linear and nn.Conv2d, but "
            f"'{block.module}.{block.name}' needs a diagonal block{why}; use "
            "engine='fast' (the default)."
        )
    for layer in layout.layers:
        if not layer.kind.curvlinops_supports(layer.module):
            raise ValueError(
                f"engine='curvlinops' supports only nn.Linear and nn.Conv2d (zero "
                f"padding), but '{layer.name}' is {layer.kind.description} "
                f"({type(layer.module).__name__}); use engine='fast' (the default)."
            )


@torch.no_grad()
def check_first_batch(
    model: nn.Module, layout: ParameterLayout, batches: LaplaceBatches
) -> None:
    """One forward pass on the first batch, refusing what curvlinops gets wrong.

    Args:
        model: The network.
        layout: Its parameter layout.
        batches: The training batches.

    Raises:
        ValueError: If a module of the layout runs twice, or a layer sees more
            rows than the batch has examples:
            curvlinops would take every row for an example.
    """
    X, _ = batches.first()
    capture = ForwardCapture(layout, diagonal=False)
    with capture:
        f = model(to_device(X, layout.params[0].device))
    if f.ndim != 2:
        raise ValueError(
            f"engine='curvlinops' needs outputs of shape (batch, outputs), got "
            f"{tuple(f.shape)}; use engine='fast' (the default), which takes "
            "token-level outputs."
        )
    for name in capture.repeated_modules:
        raise ValueError(
            f"Module '{name}' runs more than once per forward pass; curvlinops "
            "adds every call to its Kronecker factors. Use engine='fast' (the "
            "default), which keeps the one call that reaches the outputs (peft's "
            "DoRA calls its adapters on an identity matrix too) and refuses a "
            "module whose calls all do."
        )
    for name, changed in capture.changed_by_hooks.items():
        if changed:
            raise ValueError(
                f"A forward hook changes the output of layer '{name}'; curvlinops "
                "takes the changed output for the layer's, and its Kronecker "
                "factors would be wrong. Use engine='fast' (the default), which "
                "captures the output of the layer's forward itself."
            )
    for name, a in capture.inputs.items():
        if a.shape[0] != f.shape[0]:
            raise ValueError(
                f"Layer '{name}' sees {a.shape[0]} rows for a batch of "
                f"{f.shape[0]} examples (extra dimensions folded into the batch, "
                "as in reward modelling); curvlinops would take every row for an "
                "example. Use engine='fast', which groups each example's rows."
            )


def curvlinops_ekfac(
    model: nn.Module,
    layout: ParameterLayout,
    batches: LaplaceBatches,
    likelihood: Likelihood | str,
    num_data: int,
    options: EKFACOptions,
    *,
    dict_key_x: str = "input_ids",
    eigenbasis: list[tuple[Tensor, ...]] | None = None,
    progress_bar: bool = False,
) -> EKFACFactors:
    """EKFAC factors with curvlinops, in the scale of the summed torch loss.

    Args:
        model: The network (``Linear`` / ``Conv2d`` parameters only).
        layout: The parameter layout of the posterior.
        batches: The training batches.
        likelihood: ``"classification"`` or ``"regression"``.
        num_data: Number of training points.
        options: How to compute it.
        dict_key_x: Key of the inputs in dict-like batches.
        eigenbasis: Fixed eigenbasis per block (online fitting).
        progress_bar: Show curvlinops' progress bars.

    Returns:
        Eigenvectors, corrected eigenvalues and the summed loss.

    Raises:
        ValueError: For diagonal blocks, reused modules, rows folded into the
            batch or non-finite factors.
    """
    check_curvlinops_layout(layout)
    check_first_batch(model, layout, batches)
    loss_function, _ = likelihood_loss(likelihood)
    operator = EKFACLinearOperator(
        model,
        loss_function,
        layout.params,
        batches,
        progressbar=progress_bar,
        check_deterministic=False,
        seed=options.seed,
        fisher_type=_FISHER_TYPES[options.fisher_type],
        mc_samples=options.mc_samples,
        kfac_approx=str(options.kfac_approx),
        num_per_example_loss_terms=1,
        separate_weight_and_bias=True,
        num_data=num_data,
        batch_size_fn=_batch_size_fn(batches, dict_key_x),
    )
    if eigenbasis is None:
        with _compat.removing_leftover_hooks(model):
            operator.compute_kronecker_factors()
        _check_finite_factors(operator.state_dict())
    else:
        _fix_eigenbasis(operator, layout, eigenbasis)
    loss = _correction_pass(model, operator, batches, loss_function, layout.params[0])
    return _factors_from_state(model, layout, operator.state_dict(), loss)


def _batch_size_fn(
    batches: LaplaceBatches, dict_key_x: str
) -> Callable[[Any], int] | None:
    """Curvlinops' ``batch_size_fn``: needed only for dict-like batches."""
    first = next(iter(batches.loader))
    if isinstance(first, MutableMapping):
        return functools.partial(batch_size, dict_key_x=dict_key_x)
    return None


def _fix_eigenbasis(
    operator: EKFACLinearOperator,
    layout: ParameterLayout,
    eigenbasis: list[tuple[Tensor, ...]],
) -> None:
    bases = layout.layer_bases(eigenbasis)
    gradient_eigenvectors = {name: basis.gradient for name, basis in bases.items()}
    input_eigenvectors = {
        name: basis.input for name, basis in bases.items() if basis.input is not None
    }
    _compat.set_kronecker_eigenbasis(
        operator, input_eigenvectors, gradient_eigenvectors
    )


class _LossRecorder:
    """A forward hook on the model summing the loss of each batch's outputs."""

    def __init__(
        self, batches: LaplaceBatches, loss_function: nn.Module, like: Tensor
    ) -> None:
        self.batches = batches
        self.loss_function = loss_function
        self.total = torch.zeros((), dtype=like.dtype, device=like.device)

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> None:
        targets = self.batches.current_targets.to(output.device)
        self.total = self.total + self.loss_function(output.detach(), targets)


def _correction_pass(
    model: nn.Module,
    operator: EKFACLinearOperator,
    batches: LaplaceBatches,
    loss_function: nn.Module,
    like: Tensor,
) -> Tensor:
    """Curvlinops' correction pass, summing the loss on the way."""
    recorder = _LossRecorder(batches, loss_function, like)
    try:
        with _compat.removing_leftover_hooks(model):
            handle = model.register_forward_hook(recorder)
            try:
                operator.compute_eigenvalue_correction()
            finally:
                handle.remove()
    finally:
        batches.current_targets = None
    return recorder.total


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


def _factors_from_state(
    model: nn.Module, layout: ParameterLayout, state: dict[str, Any], loss: Tensor
) -> EKFACFactors:
    """Our per-block factors from curvlinops' per-module ``state_dict``."""
    mapping = EKFACLinearOperator.compute_parameter_mapping(layout.params, model)
    eigenvectors: list[tuple[Tensor, ...]] = []
    eigenvalues: list[Tensor] = []
    for block, param in zip(layout.blocks, layout.params):
        position = mapping[block.module][block.name]
        q_g = state["gradient_covariances_eigenvectors"][block.module]
        values = state["corrected_eigenvalues"][block.module][position]
        if block.name == "weight":
            q_a = state["input_covariances_eigenvectors"][block.module]
            eigenvectors.append((q_g, q_a))
            values = values.reshape(param.shape[0], -1)
        else:
            eigenvectors.append((q_g,))
        eigenvalues.append(values)
    return EKFACFactors(eigenvectors, eigenvalues, loss)

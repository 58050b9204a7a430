"""The only place that touches private attributes of other libraries.

* curvlinops: ``EKFACLinearOperator`` exposes its Kronecker eigenbasis and corrected
  eigenvalues through the public ``state_dict()``, and its two passes through the
  public ``compute_kronecker_factors()`` / ``compute_eigenvalue_correction()``. It has
  no way to *set* the eigenbasis before the correction pass, which online (continual)
  fitting needs: the new data's corrected eigenvalues must be computed in the basis of
  the first fit. That write is :func:`set_kronecker_eigenbasis`, guarded so that a
  curvlinops release which renames the attributes fails loudly.
* torch: a module's hook registries (``_forward_hooks``, ``_forward_pre_hooks``), to
  remove hooks that a failing curvlinops pass leaves behind
  (:func:`removing_leftover_hooks`), to tell whether a module has pre-hooks
  (:func:`has_pre_hooks`) and to replay a module's call without its own forward
  hooks (:func:`forward_hooks_suspended`); a tensor's version counter
  (``_version``), which tells whether a tensor was changed in place
  (:func:`tensor_version`); and the module global ``torch.nn.functional.linear``,
  through which ``F.multi_head_attention_forward`` applies its projections:
  replaced for the duration of one ``nn.MultiheadAttention`` forward pass so that
  the capture sees the projections' inputs and outputs
  (:func:`watching_functional_linear`). A ``TorchFunctionMode`` cannot see them:
  the attention function dispatches itself to the mode as a whole.

* laplace-torch: the private members of its Laplace classes that ours read
  (:data:`LAPLACE_TORCH_READS`: the model's device and dtype, the likelihood scale
  ``1/(σ² T)``, the Jacobians' device check, the last-layer search), each read
  through one function here, and the private methods that laplace-torch calls and
  our classes override (:data:`LAPLACE_TORCH_HOOKS`: the curvature's
  initialisation and fitted check, the GLM predictive, the sampled-network
  predictive). :func:`check_laplace_torch` verifies both on import, so that a
  laplace-torch release that renames one fails loudly instead of bypassing an
  override silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from curvlinops import EKFACLinearOperator
from laplace.baselaplace import BaseLaplace, ParametricLaplace
from laplace.lllaplace import LLLaplace
from torch import Tensor, nn
from torch.nn import functional as F

#: laplace-torch private members our classes read (through the functions below).
LAPLACE_TORCH_READS = (
    (BaseLaplace, "_device"),
    (BaseLaplace, "_dtype"),
    (BaseLaplace, "_H_factor"),
    (BaseLaplace, "_check_jacobians"),
    (LLLaplace, "_find_last_layer"),
)
#: laplace-torch private methods that laplace-torch itself calls and our classes
#: override (``EKFACPosterior``, ``EKFACLLLaplace``).
LAPLACE_TORCH_HOOKS = (
    (ParametricLaplace, "_init_H"),
    (ParametricLaplace, "_check_H_init"),
    (ParametricLaplace, "_glm_predictive_distribution"),
    (ParametricLaplace, "_nn_functional_samples"),
    (ParametricLaplace, "_nn_predictive_classification"),
    (LLLaplace, "_glm_predictive_distribution"),
    (LLLaplace, "_nn_predictive_samples"),
    (LLLaplace, "_nn_predictive_classification"),
)


def check_laplace_torch() -> None:
    """Refuse a laplace-torch without the private members we rely on.

    Raises:
        ImportError: Naming the missing members and the supported version.
    """
    missing = [
        f"{cls.__name__}.{name}"
        for cls, name in LAPLACE_TORCH_READS + LAPLACE_TORCH_HOOKS
        if not hasattr(cls, name)
    ]
    if missing:
        raise ImportError(
            f"The installed laplace-torch has no {missing}; ekfac_laplace reads or "
            "overrides them and supports laplace-torch 0.3. Install it: "
            "pip install 'laplace-torch>=0.3,<0.4'."
        )


def model_device(laplace: Any) -> torch.device:
    """The device of a Laplace object's model (laplace-torch's ``_device``)."""
    return laplace._device


def model_dtype(laplace: Any) -> torch.dtype:
    """The dtype of a Laplace object's model (laplace-torch's ``_dtype``)."""
    return laplace._dtype


def likelihood_scale(laplace: Any) -> Tensor:
    """``1/(σ² T)``, the factor of the curvature (laplace-torch's ``_H_factor``)."""
    return laplace._H_factor


def check_jacobians(laplace: Any, jacobians: Tensor) -> None:
    """laplace-torch's check of Jacobians given to ``functional_covariance``."""
    laplace._check_jacobians(jacobians)


def find_last_layer(laplace: Any, data: Any) -> None:
    """laplace-torch's search for the last layer with a first batch ``data``."""
    laplace._find_last_layer(data)


_EIGENVECTOR_ATTRIBUTES = (
    "_input_covariances_eigenvectors",
    "_gradient_covariances_eigenvectors",
)
_HOOK_REGISTRIES = ("_forward_hooks", "_forward_pre_hooks")


def set_kronecker_eigenbasis(
    operator: EKFACLinearOperator,
    input_eigenvectors: dict[str, Tensor],
    gradient_eigenvectors: dict[str, Tensor],
) -> None:
    """Fix the Kronecker eigenbasis of an EKFAC operator before its correction pass.

    ``EKFACLinearOperator.compute_eigenvalue_correction`` computes the eigenbasis
    from the Kronecker factors only when none is cached; caching ours makes it
    compute the corrected eigenvalues of its data in *our* basis.

    Args:
        operator: A freshly constructed curvlinops EKFAC operator.
        input_eigenvectors: Module name to ``Q_A`` (weights only).
        gradient_eigenvectors: Module name to ``Q_G``.

    Raises:
        RuntimeError: If the installed curvlinops lacks the expected attributes.
    """
    for name in _EIGENVECTOR_ATTRIBUTES:
        if not isinstance(getattr(operator, name, None), dict):
            raise RuntimeError(
                f"The installed curvlinops has no EKFACLinearOperator.{name}; "
                "ekfac_laplace supports curvlinops-for-pytorch 3.0.x. Install a "
                "supported version: pip install 'curvlinops-for-pytorch>=3.0.1,<3.1'."
            )
    operator._input_covariances_eigenvectors = dict(input_eigenvectors)
    operator._gradient_covariances_eigenvectors = dict(gradient_eigenvectors)


@contextmanager
def removing_leftover_hooks(model: nn.Module) -> Iterator[None]:
    """Remove module hooks that a failing pass of another library leaves behind.

    curvlinops installs forward hooks for each pass and removes them only when the
    pass completes; an exception in between (bad targets, NaN, a reused layer) would
    otherwise leave the user's model instrumented. Hooks that were there before are
    kept.

    Args:
        model: The model the pass runs on.

    Yields:
        Nothing; on an exception the new hooks are removed and it is re-raised.
    """
    before = {
        (id(module), registry): set(getattr(module, registry))
        for module in model.modules()
        for registry in _HOOK_REGISTRIES
    }
    try:
        yield
    except BaseException:
        for module in model.modules():
            for registry in _HOOK_REGISTRIES:
                hooks = getattr(module, registry)
                for key in set(hooks) - before.get((id(module), registry), set()):
                    del hooks[key]
        raise


def tensor_version(tensor: Tensor) -> int:
    """The version counter of ``tensor``: it grows with every in-place change.

    Args:
        tensor: Any tensor.

    Returns:
        Its current version.
    """
    return tensor._version


def has_pre_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward pre-hooks (a pruned or weight-normed layer).

    Args:
        module: Any module.

    Returns:
        ``True`` if its pre-hook registry is non-empty.
    """
    return bool(module._forward_pre_hooks)


@contextmanager
def forward_hooks_suspended(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without its own forward hooks (its pre-hooks still run).

    The per-example gradients of a module with a diagonal block replay its call
    from the gradient at the output its ``forward`` returned, which already
    accounts for what the forward hooks do downstream; running them again would
    apply them twice, and would hand hooks with side effects (laplace-torch's
    feature extractor stores the last layer's input) batched tensors.

    Args:
        module: The module (its submodules' hooks are kept).

    Yields:
        Nothing; the hooks are back afterwards, also on an exception.
    """
    hooks = module._forward_hooks
    module._forward_hooks = type(hooks)()
    try:
        yield
    finally:
        module._forward_hooks = hooks


def has_module_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or forward-pre hooks (for tests and checks).

    Args:
        module: Any module.

    Returns:
        ``True`` if either registry is non-empty.
    """
    return any(getattr(module, registry) for registry in _HOOK_REGISTRIES)


#: ``F.linear`` as torch defines it (restored by :func:`watching_functional_linear`).
_FUNCTIONAL_LINEAR = F.linear


def watching_functional_linear(
    report: Callable[[Tensor, Tensor, Tensor | None, Tensor], None],
) -> Callable[[], None]:
    """Let ``report(input, weight, bias, output)`` see every ``F.linear`` call.

    ``torch.nn.functional``'s own functions (``F.multi_head_attention_forward``)
    look ``linear`` up in their module at call time, so replacing it there makes
    them call the watcher.

    Args:
        report: Called after each call with its arguments and result.

    Returns:
        A function that restores torch's ``F.linear`` (safe to call twice).

    Raises:
        RuntimeError: If the installed torch has no ``torch.nn.functional.linear``.
    """
    if getattr(F, "linear", None) is not _FUNCTIONAL_LINEAR:
        raise RuntimeError(
            "torch.nn.functional.linear is missing or already replaced; "
            "ekfac_laplace cannot capture nn.MultiheadAttention's projections. "
            "Freeze the attention's parameters with requires_grad_(False)."
        )

    def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        output = _FUNCTIONAL_LINEAR(input, weight, bias)
        report(input, weight, bias, output)
        return output

    F.linear = linear

    def restore() -> None:
        F.linear = _FUNCTIONAL_LINEAR

    return restore

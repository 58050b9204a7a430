r"""The check that every block computes what the engine assumes, on real data.

EKFAC's Kronecker blocks assume that a layer applies its weight as a linear map of
what the capture records: the gradient of the weight is then the sum over the
examples ``n`` and the positions ``s`` sharing the weight of the outer products of
the output gradients and the inputs,

$$
    \nabla_W \langle v, f \rangle = \sum_{n,s} g_{n,s}\, a_{n,s}^\top ,
    \qquad \nabla_b \langle v, f \rangle = \sum_{n,s} g_{n,s},
$$

for any direction ``v`` of the outputs ``f``. A layer whose class overrides
``forward`` (a masked or cosine linear layer, a weight-standardised convolution),
whose weight a pre-hook recomputes, or whose weight also reaches the outputs outside
its own call (``F.linear(h, layer.weight)``) breaks this, and EKFAC fitted anyway
would be a plausible but wrong posterior. A diagonal block assumes less: that the
parameter reaches the outputs only through its module's call, whose per-example
gradients sum to the parameter's gradient.

:func:`checked_layout` tests both on the first batch, for every kind of layer
alike: one forward pass under the :class:`~ekfac_laplace.capture.ForwardCapture`
and one backward pass of ``⟨v, f⟩`` for a random ``v`` give autograd's gradient of
every parameter of the posterior and, through the same capture the engines use,
what each block rebuilds it from. A Kronecker layer whose rebuilt gradient differs
gets its exact diagonal block (with a warning), or is refused under
``unsupported_layers="raise"``; a parameter whose diagonal block differs too is
refused. Every message names the module and the likely cause.

A forward hook of the user's that changes a layer's output does not break the
assumption: the capture sees the output of ``forward`` itself, and the gradient
arriving there accounts for the hook. Nor does a pre-hook that changes the input:
the capture sees what ``forward`` receives.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_laplace._compat import has_pre_hooks
from ekfac_laplace.batches import check_outputs, to_device
from ekfac_laplace.capture import ForwardCapture
from ekfac_laplace.diagonal import restricted_gradients
from ekfac_laplace.distributed import LocalRanks
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.layout import (
    FITTED_DIAGONAL,
    REQUESTED_DIAGONAL,
    DiagonalModule,
    KroneckerLayer,
    ParameterLayout,
)
from ekfac_laplace.options import UnsupportedLayers

#: Largest relative difference (Frobenius) between autograd's gradient and the
#: rebuilt one that is rounding, by the dtype the model computes in: a layer that
#: does not compute ``y = W x + b`` differs by tens of percent.
TOLERANCES = {
    torch.float64: 1e-8,
    torch.float32: 1e-3,
    torch.float16: 3e-2,
    torch.bfloat16: 6e-2,
}
#: Seed of the random output direction ``v`` (the global generator is untouched).
DIRECTION_SEED = 0
#: Examples of the first batch the check runs on: enough for any layer that does
#: not compute what it should to show it, few enough to cost a fraction of a
#: batch (0.3% of the benchmark's CNN fit).
CHECK_EXAMPLES = 32


class LayerCheckError(ValueError):
    """A parameter's block would not be exact, and no other block can be."""


def checked_layout(
    model: nn.Module,
    layout: ParameterLayout,
    X: Any,
    ranks: LocalRanks | None = None,
    keep: bool = False,
) -> ParameterLayout:
    """The layout with every layer that fails the check on diagonal blocks.

    Args:
        model: The network.
        layout: Its parameter layout.
        X: A batch of inputs (the first examples of the fit's first batch).
        ranks: The ranks of a data-parallel fit: each checks its own batch, and a
            layer failing on any rank gets diagonal blocks on every rank.
        keep: Refuse any change of the layout (online fitting keeps the first
            fit's blocks).

    Returns:
        The layout itself if every block passes, else a new layout.

    Raises:
        LayerCheckError: For a failing layer with ``unsupported_layers="raise"``
            or ``keep``, or a parameter that not even a diagonal block captures.
    """
    ranks = LocalRanks() if ranks is None else ranks
    X = to_device(X, layout.params[0].device)
    failing = ranks.run(lambda: failing_layers(model, layout, X), "the layer check")
    failing = dict(ranks.gather(sorted(failing.items())))
    if not failing:
        _warn_about(layout.demoted, layout)
        return layout
    name, reason = next(iter(failing.items()))
    if keep:
        raise LayerCheckError(
            f"Layer '{name}' had Kronecker blocks in the previous fit but fails the "
            f"layer check now ({reason}): the model changed since that fit. Fit "
            "again with override=True."
        )
    if layout.unsupported_layers == UnsupportedLayers.RAISE:
        raise LayerCheckError(
            f"Layer '{name}' {reason}. KFAC cannot factorise it; use "
            "unsupported_layers='diagonal' (the default) for its exact diagonal "
            "block, or freeze it with requires_grad_(False)."
        )
    demoted = layout.with_diagonal(failing)
    again = ranks.run(lambda: failing_layers(model, demoted, X), "the layer check")
    if again:  # the Kronecker layers that passed once do not fail now
        raise RuntimeError(
            f"The layer check is not reproducible: '{next(iter(again))}' passed it "
            "once and failed it on the same batch. Is the model deterministic in "
            "eval mode?"
        )
    _warn_about(demoted.demoted, demoted)
    return demoted


def failing_layers(model: nn.Module, layout: ParameterLayout, X: Any) -> dict[str, str]:
    """Check every block of ``layout`` on one batch.

    Args:
        model: The network.
        layout: Its parameter layout.
        X: A batch of inputs, on the model's device.

    Returns:
        Kronecker layer name to why it fails (empty if all pass).

    Raises:
        LayerCheckError: If a parameter with a diagonal block fails.
        ValueError: If the model does not return one tensor.
    """
    capture = ForwardCapture(layout, diagonal=True, batch=_examples(X))
    with torch.enable_grad():
        with capture:
            f = check_outputs(model(X))
        if not f.requires_grad:
            return {}  # no parameter of the posterior reaches the outputs
        capture.locate_batches(f, layout.backprop_targets(), check=False)
        generator = torch.Generator(device=f.device).manual_seed(DIRECTION_SEED)
        direction = torch.randn(
            f.shape, generator=generator, dtype=f.dtype, device=f.device
        )
        gradients = torch.autograd.grad(
            (f * direction).sum(), layout.params, allow_unused=True
        )
    tolerance = TOLERANCES.get(f.dtype, 1e-3)
    failing = {}
    for layer in layout.layers:
        capture.check_ran(layer)
        error = _layer_error(layer, capture, gradients)
        if error > tolerance:
            failing[layer.name] = (
                "does not compute y = W x + b with its parameters: its gradient on "
                "the first batch differs by "
                f"{error:.1%} from the one rebuilt from its inputs and output "
                f"gradients ({_suspected_causes(layer)})"
            )
    for entry in layout.diagonal_modules:
        for name, error in _diagonal_errors(entry, capture, gradients).items():
            if error > tolerance:
                raise LayerCheckError(
                    f"The gradient of '{_qualified(entry.name, name)}' on the first "
                    f"batch differs by {error:.1%} from the sum of the per-example "
                    f"gradients of its module '{entry.name}' "
                    f"({type(entry.module).__name__}): the parameter reaches the "
                    "outputs outside that module's call (used functionally, e.g. "
                    "F.linear(h, module.weight), or the module's forward depends "
                    "on more than its inputs), so no block computed from the "
                    "module is exact. Use it only inside its module, or freeze it "
                    "with requires_grad_(False)."
                )
    return failing


def _examples(X: Any) -> int | None:
    """The number of examples of a model input (``None`` if it cannot be told)."""
    if isinstance(X, Tensor):
        return X.shape[0] if X.ndim else None
    if isinstance(X, Mapping):
        rows = {v.shape[0] for v in X.values() if isinstance(v, Tensor) and v.ndim}
        return rows.pop() if len(rows) == 1 else None
    return None


def _layer_error(
    layer: KroneckerLayer, capture: ForwardCapture, gradients: tuple[Any, ...]
) -> float:
    """The largest relative difference of the layer's rebuilt gradients."""
    passes = capture.take_gradients(layer.name)
    a = layer.inputs(capture.take_input(layer.name))
    dtype = accumulation_dtype(a.dtype)
    a = a.to(dtype)
    output_gradient = passes[0] if passes else None  # None: it does not reach f
    errors = []
    weight_index = next(
        (i for i in (layer.weight_index, layer.dense_weight_index) if i is not None),
        None,
    )
    bias_index = next(
        (i for i in (layer.bias_index, layer.dense_bias_index) if i is not None), None
    )
    if weight_index is not None:
        G = layer.groups  # each group's rows rebuild its own map
        rebuilt = a.new_zeros(G, layer.out_features, layer.in_features)
        if output_gradient is not None:
            g = layer.output_gradients(output_gradient).to(dtype)
            rebuilt = torch.einsum(
                "nsgi,nsgj->gij",
                g.reshape(*g.shape[:2], G, -1),
                a.reshape(*a.shape[:2], G, -1),
            )
        actual = gradients[weight_index]
        actual = None if actual is None else layer.as_groups(actual)
        errors.append(_relative_error(rebuilt, actual))
    if bias_index is not None:
        rebuilt = a.new_zeros(layer.module.get_parameter(layer.bias_name).numel())
        if output_gradient is not None:
            rebuilt = layer.bias_gradients(output_gradient).to(dtype).sum((0, 1))
        errors.append(_relative_error(rebuilt, gradients[bias_index]))
    return max(errors)


def _diagonal_errors(
    entry: DiagonalModule, capture: ForwardCapture, gradients: tuple[Any, ...]
) -> dict[str, float]:
    """Per parameter of a diagonal module, the relative difference of its sums."""
    passes = capture.take_gradients(entry.name)
    if passes:
        (leaf_gradients,) = passes
        per_example = restricted_gradients(
            entry.module, entry.param_names, capture.calls[entry.name], leaf_gradients
        )
    errors = {}
    for i, (name, index) in enumerate(zip(entry.param_names, entry.indices)):
        param = entry.module.get_parameter(name)
        dtype = accumulation_dtype(param.dtype)
        rebuilt = torch.zeros(param.shape, dtype=dtype, device=param.device)
        if passes:
            rows, grads = per_example[i]
            summed = grads.to(dtype).sum(0)
            if rows is None:
                rebuilt = summed.reshape(param.shape)
            else:
                rebuilt.index_add_(0, rows, summed)
        errors[name] = _relative_error(rebuilt, gradients[index])
    return errors


def _relative_error(rebuilt: Tensor, actual: Tensor | None) -> float:
    """``‖rebuilt − actual‖ / max(‖rebuilt‖, ‖actual‖)``; ``0`` for two zeros."""
    rebuilt = rebuilt.detach().double()
    actual = torch.zeros_like(rebuilt) if actual is None else actual.detach().double()
    scale = max(float(rebuilt.norm()), float(actual.norm()))
    if scale == 0.0:
        return 0.0
    return float((rebuilt - actual.reshape(rebuilt.shape)).norm()) / scale


def _suspected_causes(layer: KroneckerLayer) -> str:
    """What usually makes a layer fail the check, from what can be seen."""
    module = layer.module
    base = layer.kind.assumed_class(module)
    if base is not None and type(module).forward is not base.forward:
        return (
            f"{type(module).__name__} overrides {base.__name__}.forward, e.g. to "
            "mask or normalise the weight"
        )
    if has_pre_hooks(module):
        return "a forward pre-hook changes the weight that forward uses"
    return (
        "its weight or bias also reaches the outputs outside the layer's call, "
        "e.g. F.linear(h, layer.weight) elsewhere in the model"
    )


def _qualified(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _warn_about(demoted: Mapping[str, str], layout: ParameterLayout) -> None:
    """One warning for the Kronecker layers that get diagonal blocks."""
    shown = {
        name: reason
        for name, reason in demoted.items()
        if name not in layout.oversized
        and reason not in (FITTED_DIAGONAL, REQUESTED_DIAGONAL)
    }
    if not shown:
        return
    lines = "; ".join(f"'{name}' {reason}" for name, reason in shown.items())
    warnings.warn(
        f"{len(shown)} layer(s) of a Kronecker-factored kind get their exact "
        f"diagonal block instead of Kronecker blocks: {lines}. Pass "
        "unsupported_layers='raise' to refuse them instead.",
        UserWarning,
        stacklevel=5,
    )

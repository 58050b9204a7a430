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
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_laplace._compat import has_pre_hooks
from ekfac_laplace.batches import check_outputs, to_device
from ekfac_laplace.capture import ForwardCapture
from ekfac_laplace.diagonal import on_every_row, restricted_gradients
from ekfac_laplace.distributed import LocalRanks
from ekfac_laplace.driver import backward
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.layer import KroneckerLayer, group_rows
from ekfac_laplace.layout import (
    FITTED_DIAGONAL,
    REQUESTED_DIAGONAL,
    DiagonalModule,
    ParameterLayout,
)
from ekfac_laplace.options import UnsupportedLayers
from ekfac_laplace.probes import locate_batches, route_rows

#: Largest relative difference (Frobenius) between autograd's gradient and the
#: rebuilt one that is rounding, by the dtype the model computes in: a layer that
#: does not compute ``y = W x + b`` differs by tens of percent.
TOLERANCES = {
    torch.float64: 1e-8,
    torch.float32: 1e-3,
    torch.float16: 3e-2,
    torch.bfloat16: 6e-2,
}
#: Smallest relative difference of the weighted sums that counts as examples
#: influencing each other: a float64 model computing parts in float32 (LLaMA's
#: RMSNorm) rounds the two backward passes differently by about 1e-7.
COUPLING_TOLERANCE = 1e-4
#: Where the terms of a rebuilt gradient cancel, its difference from autograd's is
#: measured against this fraction of ``Σ ‖term‖`` at least: rounding in the dtype
#: the model computes in stays below the tolerance there, and a layer that does not
#: compute what it should still differs by far more.
ROUNDING_FLOORS = {
    torch.float64: 1e-5,
    torch.float32: 0.1,
    torch.float16: 0.5,
    torch.bfloat16: 0.5,
}
#: A parameter whose gradient is below this fraction of the norm of all the
#: posterior's gradients, by the dtype the model computes in, is zero up to
#: rounding (a top-1 router's, whose normalised weight is always 1): its rebuilt
#: gradient is compared against that scale, not its own.
GLOBAL_FLOORS = {
    torch.float64: 1e-13,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-3,
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

    Two backward passes of one forward pass: ``⟨v, f⟩`` for a random direction
    ``v`` checks what each block rebuilds the gradient from (the layer's inputs
    and output gradients, or the module's per-example gradients); ``Σ_n w_n ⟨v_n,
    f_n⟩`` with random example weights ``w_n`` checks that the rows the first pass
    gave example ``n`` come from example ``n``'s outputs alone: where examples
    influence each other (anywhere in the batch), the same weighting of the
    rebuilt per-example gradients differs from autograd's, with probability one.
    A second forward pass without gradients checks that the outputs are a
    function of the inputs.

    Args:
        model: The network.
        layout: Its parameter layout.
        X: A batch of inputs, on the model's device.

    Returns:
        Kronecker layer name to why it fails (empty if all pass).

    Raises:
        LayerCheckError: If a parameter with a diagonal block fails, the forward
            pass is random, or examples influence each other.
        ValueError: If the model does not return one tensor.
    """
    batch = _examples(X)
    capture = ForwardCapture(layout, diagonal=True, batch=batch)
    with torch.enable_grad():
        with capture:
            f = check_outputs(model(X))
        if not f.requires_grad:
            return {}  # no parameter of the posterior reaches the outputs
        capture.settle_calls(f)
        route_rows(capture, f, layout.backprop_targets())
        tolerance = TOLERANCES.get(f.dtype, 1e-3)
        _check_deterministic(model, X, f, tolerance)
        locate_batches(capture, f, layout.backprop_targets(), check=False)
        generator = torch.Generator(device=f.device).manual_seed(DIRECTION_SEED)
        direction = torch.randn(
            f.shape, generator=generator, dtype=f.dtype, device=f.device
        )
        weights = None  # per example, where examples can be told apart
        if batch is not None and batch > 1 and f.shape[0] == batch:
            weights = 0.5 + torch.rand(
                batch, generator=generator, dtype=f.dtype, device=f.device
            )
        gradients = backward(
            (f * direction).sum(), layout.params, retain_graph=weights is not None
        )
        weighted = None
        if weights is not None:
            per_example = weights.reshape(-1, *[1] * (f.ndim - 1))
            weighted = backward((f * direction * per_example).sum(), layout.params)
    floors = _global_floors(f.dtype, gradients, weighted)
    failing = {}
    for layer in layout.layers:
        capture.check_ran(layer)
        error, coupled = _layer_errors(
            layer, capture, gradients, weights, weighted, floors
        )
        if error > tolerance:
            failing[layer.name] = (
                "does not compute y = W x + b with its parameters: its gradient on "
                "the first batch differs by "
                f"{error:.1%} from the one rebuilt from its inputs and output "
                f"gradients ({_suspected_causes(layer)})"
            )
        elif coupled > max(tolerance, COUPLING_TOLERANCE):
            raise LayerCheckError(_coupling_message(layer.name, coupled))
    errors = _diagonal_errors(
        layout, capture, gradients, weights, weighted, floors, f.shape[0]
    )
    for name, (entry, error, coupled) in errors.items():
        if error > tolerance:
            raise LayerCheckError(
                f"The gradient of '{name}' on the first batch differs by "
                f"{error:.1%} from the sum of the per-example gradients of its "
                f"module '{entry.name}' ({type(entry.module).__name__}): the "
                "parameter reaches the outputs outside that module's call (used "
                "functionally, e.g. F.linear(h, module.weight), or the module's "
                "forward depends on more than its inputs), so no block computed "
                "from the module is exact. Use it only inside its module, or "
                "freeze it with requires_grad_(False)."
            )
        if coupled > max(tolerance, COUPLING_TOLERANCE):
            raise LayerCheckError(_coupling_message(name, coupled))
    return failing


def _check_deterministic(model: nn.Module, X: Any, f: Tensor, tolerance: float) -> None:
    """Refuse a model whose outputs on the same inputs differ between passes."""
    if not bool(torch.isfinite(f).all()):
        return  # NaN / Inf outputs are refused later, naming the first layer
    with torch.no_grad():
        again = check_outputs(model(X))
    error = _relative_error(again, f) if again.shape == f.shape else 1.0
    if error <= tolerance:
        return
    raise LayerCheckError(
        "The model's outputs on the same inputs differ between two forward passes "
        f"(by {error:.1%} on the first batch): its forward pass is random "
        "(dropout that ignores eval mode, such as F.dropout(x, training=True) or "
        "Monte-Carlo dropout left on; noise or sampling in forward). A Laplace "
        "approximation needs the network as a deterministic function of its "
        "parameters: switch the randomness off for the fit and the predictive "
        "(la.fit() calls model.eval(), which stops nn.Dropout)."
    )


def _global_floors(
    dtype: torch.dtype, gradients: tuple[Any, ...], weighted: tuple[Any, ...] | None
) -> tuple[float, float]:
    """The scale of rounding in every gradient of the plain and weighted pass."""

    def norm(found: tuple[Any, ...] | None) -> float:
        present = [g.detach().double().norm() for g in found or () if g is not None]
        return float(torch.stack(present).norm()) if present else 0.0

    fraction = GLOBAL_FLOORS.get(dtype, 1e-6)
    return fraction * norm(gradients), fraction * norm(weighted)


def _coupling_message(name: str, error: float) -> str:
    return (
        f"The examples of a batch influence each other's outputs: the gradient of "
        f"'{name}' for a loss weighted per example differs by {error:.2%} from the "
        "same weighting of its per-example gradients (a statistic over the batch "
        "in the forward pass, such as a batch mean or a batch norm in training "
        "mode; attention or other mixing across the batch dimension; rows of one "
        "example written into another's, or extra dimensions folded into the "
        "batch so that each example's rows are not consecutive). The per-example "
        "curvature that a Laplace approximation sums is then undefined. Make the "
        "forward pass treat each example on its own (model.eval() for batch "
        "norms; the batch dimension first and never mixed; fold extra dimensions "
        "with x.reshape(batch * m, ...), which keeps each example's rows "
        "together)."
    )


def _examples(X: Any) -> int | None:
    """The number of examples of a model input (``None`` if it cannot be told)."""
    if isinstance(X, Tensor):
        return X.shape[0] if X.ndim else None
    if isinstance(X, Mapping):
        rows = {v.shape[0] for v in X.values() if isinstance(v, Tensor) and v.ndim}
        return rows.pop() if len(rows) == 1 else None
    return None


def _example_weights(weights: Tensor | None, rows: int) -> Tensor | None:
    """Per row, its example's weight (rows of one example are consecutive)."""
    if weights is None or rows % weights.shape[0]:
        return None
    return weights.repeat_interleave(rows // weights.shape[0])


#: A rebuilt gradient for row weights (``None``: all one): the tensor, and a bound
#: on the norm of the sum it is (``Σ_rows ‖term‖``), the scale of its rounding.
Rebuild = Callable[[Tensor | None], tuple[Tensor, float]]


class _Errors:
    """The largest plain and weighted differences of one module's rebuilt sums."""

    def __init__(
        self,
        gradients: tuple[Any, ...],
        weights: Tensor | None,
        weighted: tuple[Any, ...] | None,
        dtype: torch.dtype,
        floors: tuple[float, float],
    ) -> None:
        self.gradients = gradients
        self.weights = weights
        self.weighted = weighted
        self.floor = ROUNDING_FLOORS.get(dtype, 0.1)
        self.floors = floors
        self.plain: list[float] = []
        self.coupled: list[float] = []

    def compare(
        self,
        rebuild: Rebuild,
        index: int,
        rows: int,
        layout: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Add the differences of ``rebuild`` from autograd's gradient ``index``.

        Args:
            rebuild: The rebuilt gradient for row weights.
            index: The parameter's block index.
            rows: The rows (examples, or ``B·m`` folded rows) it sums.
            layout: How autograd's gradient is laid out like the rebuilt one.
        """

        def actual(found: tuple[Any, ...]) -> Tensor | None:
            value = found[index]
            return value if value is None or layout is None else layout(value)

        rebuilt, bound = rebuild(None)
        rounding = max(self.floor * bound, self.floors[0])
        self.plain.append(_relative_error(rebuilt, actual(self.gradients), rounding))
        row_weights = _example_weights(self.weights, rows)
        if row_weights is not None and self.weighted is not None:
            rebuilt, bound = rebuild(row_weights.to(rebuilt.dtype))
            rounding = max(self.floor * bound, self.floors[1])
            self.coupled.append(
                _relative_error(rebuilt, actual(self.weighted), rounding)
            )

    def largest(self) -> tuple[float, float]:
        """``(error, coupling)``: the largest plain and weighted differences."""
        return max(self.plain, default=0.0), max(self.coupled, default=0.0)


def _weighted_rows(rows: Tensor, row_weights: Tensor | None) -> Tensor:
    if row_weights is None:
        return rows
    return rows * row_weights.reshape(-1, *[1] * (rows.ndim - 1))


def _layer_errors(
    layer: KroneckerLayer,
    capture: ForwardCapture,
    gradients: tuple[Any, ...],
    weights: Tensor | None,
    weighted: tuple[Any, ...] | None,
    floors: tuple[float, float],
) -> tuple[float, float]:
    """The largest relative differences of the layer's rebuilt gradients.

    Returns:
        ``(error, coupling)``: of the plain gradients, and of the weighted ones
        (``0`` without weights).
    """
    passes = capture.take_gradients(layer.name)
    a = layer.inputs(capture.take_input(layer.name))
    errors = _Errors(gradients, weights, weighted, a.dtype, floors)
    dtype = accumulation_dtype(a.dtype)
    a = a.to(dtype)
    output_gradient = passes[0] if passes else None  # None: it does not reach f
    weight_index = next(
        (i for i in (layer.weight_index, layer.dense_weight_index) if i is not None),
        None,
    )
    bias_index = next(
        (i for i in (layer.bias_index, layer.dense_bias_index) if i is not None), None
    )
    if weight_index is not None:
        G = layer.groups  # each group's rows rebuild its own map
        g = None
        if output_gradient is not None:
            g = layer.output_gradients(output_gradient).to(dtype)

        def weight_gradient(row_weights: Tensor | None) -> tuple[Tensor, float]:
            if g is None:
                return a.new_zeros(G, layer.out_features, layer.in_features), 0.0
            rows = _weighted_rows(g, row_weights)
            rebuilt = torch.einsum(
                "nsgi,nsgj->gij",
                rows.reshape(*rows.shape[:2], G, layer.out_features),
                a.reshape(*a.shape[:2], G, layer.in_features),
            )
            return rebuilt, float(rows.norm()) * float(a.norm())

        errors.compare(weight_gradient, weight_index, a.shape[0], layer.as_groups)
    if bias_index is not None:
        bias = layer.module.get_parameter(layer.bias_name)
        b = None
        if output_gradient is not None:
            b = layer.bias_gradients(output_gradient).to(dtype)

        def bias_gradient(row_weights: Tensor | None) -> tuple[Tensor, float]:
            if b is None:
                return a.new_zeros(bias.numel()), 0.0
            rows = _weighted_rows(b, row_weights)
            return rows.sum((0, 1)), float(rows.norm(dim=-1).sum())

        errors.compare(bias_gradient, bias_index, a.shape[0])
    return errors.largest()


def _diagonal_errors(
    layout: ParameterLayout,
    capture: ForwardCapture,
    gradients: tuple[Any, ...],
    weights: Tensor | None,
    weighted: tuple[Any, ...] | None,
    floors: tuple[float, float],
    batch: int,
) -> dict[str, tuple[DiagonalModule, float, float]]:
    """Per parameter with a diagonal block, the relative differences of its sums.

    A tied parameter's per-example gradients are the sums over its modules'.

    Returns:
        Parameter name to its module and ``(error, coupling)``, as
        :func:`_layer_errors`.
    """
    per_example: dict[int, tuple[str, DiagonalModule, Tensor | None, Tensor]] = {}
    for entry in layout.diagonal_modules:
        passes = capture.take_gradients(entry.name)
        found = []
        if passes:
            found = restricted_gradients(
                entry.module, entry.param_names, capture.calls[entry.name], passes[0]
            )
        for i, (name, index) in enumerate(zip(entry.param_names, entry.indices)):
            param = entry.module.get_parameter(name)
            dtype = accumulation_dtype(param.dtype)
            rows, grads = (
                found[i] if found else (None, param.new_zeros(0, *param.shape))
            )
            grads = grads.detach().to(dtype)
            qualified = _qualified(entry.name, name)
            if index not in layout.tied:
                per_example[index] = (qualified, entry, rows, grads)
                continue
            grads = on_every_row(rows, grads, param.shape)
            grads = group_rows(grads.unsqueeze(1), batch, entry.name).sum(1)
            owner = entry
            if index in per_example:
                qualified, owner, _, earlier = per_example[index]
                grads = earlier + grads
            per_example[index] = (qualified, owner, None, grads)
    errors = {}
    for index, (qualified, owner, rows, grads) in per_example.items():
        param = layout.params[index]
        check = _Errors(gradients, weights, weighted, param.dtype, floors)

        def summed(
            row_weights: Tensor | None,
            param: Tensor = param,
            rows: Tensor | None = rows,
            grads: Tensor = grads,
        ) -> tuple[Tensor, float]:
            rebuilt = torch.zeros(param.shape, dtype=grads.dtype, device=param.device)
            if not grads.numel():
                return rebuilt, 0.0
            grads = _weighted_rows(grads, row_weights)
            total = grads.sum(0)
            bound = float(grads.flatten(1).norm(dim=1).sum())
            if rows is None:
                return total.reshape(param.shape), bound
            return rebuilt.index_add_(0, rows, total), bound

        check.compare(summed, index, grads.shape[0])
        errors[qualified] = (owner, *check.largest())
    return errors


def _relative_error(
    rebuilt: Tensor, actual: Tensor | None, rounding: float = 0.0
) -> float:
    """``‖rebuilt − actual‖ / max(‖rebuilt‖, ‖actual‖, rounding)``; ``0`` for zeros.

    ``rounding`` keeps a sum whose terms cancel (a key projection's bias, whose
    gradient is zero up to rounding) from comparing two roundings.
    """
    rebuilt = rebuilt.detach().double()
    actual = torch.zeros_like(rebuilt) if actual is None else actual.detach().double()
    scale = max(float(rebuilt.norm()), float(actual.norm()), rounding)
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
    """One warning for the Kronecker layers that get diagonal blocks.

    And one for the tied parameters.
    """
    if layout.tied:
        tied = "; ".join(
            f"{[_qualified(module, name) for module, name, _ in uses]}"
            for uses in layout.tied.values()
        )
        warnings.warn(
            f"{len(layout.tied)} parameter(s) applied by several modules (weight "
            f"tying) get their exact diagonal block, each example's gradient "
            f"summed over the uses: {tied}. Pass unsupported_layers='raise' to "
            "refuse them instead.",
            UserWarning,
            stacklevel=5,
        )
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

"""What the layout's modules see in one forward pass, and their output gradients.

:class:`ForwardCapture` is the one set of forward hooks that both the EKFAC engine
and the GLM predictive use. It records what each module of a
:class:`~ekfac_laplace.layout.ParameterLayout` receives in a forward pass, refuses
modules that run more than once, and stores the gradients arriving at their outputs
during backward:

* ``nn.Linear`` / ``nn.Conv2d`` / GPT-2 ``Conv1D``: the input its ``forward``
  receives and the output it returns, from a forward hook that runs before any
  other: a hook of the user's that changes the output (``lambda m, i, o: 2 * o``)
  acts downstream of the captured output, so the gradient arriving there accounts
  for it and ``y = W x + b`` still holds for what is captured;
* ``nn.MultiheadAttention``'s projections, which it applies with ``F.linear`` on
  sequence-first tensors inside ``F.multi_head_attention_forward``: during its
  forward pass every such call whose weight is the packed ``in_proj_weight`` (or a
  slice of it: query rows, key and value rows) or ``out_proj.weight`` is seen
  (:func:`~ekfac_laplace._compat.watching_functional_linear`). The
  calls of one projection become positions of one layer: their inputs concatenated,
  each output gradient placed in the rows of the weight it used (zero elsewhere), so
  that ``Σ_s g_s a_sᵀ`` is the weight's gradient;
* modules with diagonal blocks: their call (:class:`~ekfac_laplace.diagonal.ModuleCall`,
  any structure of inputs and outputs) with the arguments as the caller passed them
  (before the module's forward pre-hooks, which a pruned or weight-normed layer
  uses to compute its weight) and the output its ``forward`` returned (before its
  forward hooks), and the gradient at each output tensor; its per-example
  gradients replay its pre-hooks and ``forward``
  (:func:`~ekfac_laplace.diagonal.per_example_gradients`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from ekfac_laplace._compat import (
    has_pre_hooks,
    tensor_version,
    watching_functional_linear,
)
from ekfac_laplace.diagonal import ModuleCall
from ekfac_laplace.errors import CaptureError, UnsplittableCallError
from ekfac_laplace.layer import KroneckerLayer, RowGroupingError, group_rows
from ekfac_laplace.layout import ParameterLayout

__all__ = [
    "CaptureError",
    "ForwardCapture",
    "ReusedModuleError",
    "RowGroupingError",
    "UnsplittableCallError",
    "group_rows",
]

#: The gradients of a diagonal module in one backward pass: one per output tensor
#: (``None`` where none arrived).
LeafGradients = tuple[Tensor | None, ...]


class ReusedModuleError(CaptureError):
    """Several calls of a module of the layout reach the outputs of one pass."""

    def __init__(self, name: str, calls: int = 2) -> None:
        super().__init__(
            f"Module '{name}' runs {calls} times per forward pass and each of "
            "these calls reaches the outputs (a reused or tied layer): its gradient "
            "mixes the uses, and EKFAC cannot factorise its curvature. Use a "
            "separate module per use, or freeze it with requires_grad_(False)."
        )


@dataclass
class _Projection:
    """The ``F.linear`` calls of one attention projection in a forward pass."""

    layer: KroneckerLayer
    inputs: list[Tensor] = field(default_factory=list)  # (B, S_c, d_in) each
    rows: list[tuple[int, int]] = field(default_factory=list)  # weight rows used
    gradients: list[list[Tensor]] = field(default_factory=list)  # per call, per pass


class ForwardCapture:
    """What the layout's modules see in one forward pass, and their output gradients.

    Used as a context manager around the forward pass: on entry it installs its
    hooks, on exit it removes them all (also when the forward pass raises), so that
    later calls of the same modules (per-example gradients of diagonal blocks) are
    not seen. During the forward pass it records

    * for each Kronecker layer, its input (detached) in :attr:`inputs` and its output
      with the output's version counter in :attr:`outputs` (an in-place change after
      the layer bumps the version; the output ``None`` without ``keep_outputs``);
    * for each diagonal module (``diagonal=True``), its call in :attr:`calls`;

    and it registers a hook on each output that keeps the gradient arriving there in
    a backward pass (:meth:`take_gradients`; outputs that do not require grad get
    none).

    A module's batch dimension is 0 unless :attr:`batch_dims` says otherwise
    (``nn.Linear`` layers and layer norms inside a sequence-first transformer see
    ``(T, B, d)``): given by the caller, or found by
    :func:`~ekfac_laplace.probes.locate_batches`.
    :meth:`take_input` and :meth:`take_gradients` hand tensors on with the batch in
    dimension 0.

    Args:
        layout: The parameter layout whose modules are captured.
        diagonal: Also capture the diagonal modules.
        batch: The number of examples of the forward pass, if known: a diagonal
            module whose output is one tensor with one row then hands on that row
            expanded to ``batch`` rows, so that each example's output gradient is
            captured.
        batch_dims: Module name to its batch dimension, where known and not 0.
        keep_outputs: Hold each layer's output tensor after the forward pass (the
            fit back-propagates to it). With ``False`` only its version is kept,
            and the tensor is left to autograd, which frees an output no backward
            function needs (a LoRA adapter's ``(B, T, out)`` product): the GLM
            predictive, which back-propagates to parameters, keeps none.

    Raises:
        ReusedModuleError: (during the forward pass) if a module runs twice.
        UnsplittableCallError: if a diagonal module's examples cannot be told
            apart.
    """

    def __init__(
        self,
        layout: ParameterLayout,
        diagonal: bool = True,
        batch: int | None = None,
        batch_dims: dict[str, int] | None = None,
        keep_outputs: bool = True,
    ) -> None:
        self.layout = layout
        self.keep_outputs = keep_outputs
        self.diagonal = diagonal
        self.batch = batch
        self.batch_dims: dict[str, int] = dict(batch_dims or {})
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, tuple[Tensor | None, int]] = {}
        self.calls: dict[str, ModuleCall] = {}
        self._gradients: dict[str, list[Tensor]] = {}
        self._leaf_gradients: dict[str, dict[int, list[Tensor]]] = {}
        self._projections: dict[int, _Projection] = {}  # id(weight) → its calls
        self._attentions: dict[int, tuple[int, int]] = {}  # running: (L, B)
        self._handles: list[RemovableHandle] = []
        self._restore_linear: Callable[[], None] | None = None
        # Per diagonal module: its arguments as passed, before its pre-hooks.
        self._raw_calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        # Per module, the autograd nodes of its latest call's outputs; per module
        # that ran more than once, every call (until settle_calls).
        self._nodes: dict[str, list[Any]] = {}
        self._repeated: dict[str, list[_Call]] = {}
        #: Layer name to where each of its rows goes in its per-example layout
        #: (rows ``n·m … n·m + m − 1`` for example ``n``) and its length ``B·m``:
        #: the layers called on some of the examples' rows
        #: (:func:`~ekfac_laplace.probes.route_rows`).
        self.routes: dict[str, tuple[Tensor, int]] = {}
        #: Kronecker layer name to whether a forward hook of the user's replaced
        #: (or changed in place) the output its ``forward`` returned.
        self.changed_by_hooks: dict[str, bool] = {}
        #: Where set, called with ``(name, gradient)`` (batch first) for a Kronecker
        #: layer's output gradient as autograd computes it, instead of keeping it
        #: for :meth:`take_gradients`: the caller reduces it during the backward pass
        #: and autograd frees it. Not for attention projections (their calls are
        #: assembled after the pass).
        self.receiver: Callable[[str, Tensor], None] | None = None

    def __enter__(self) -> ForwardCapture:
        attentions: dict[int, nn.MultiheadAttention] = {}
        for layer in self.layout.layers:
            if layer.attention is None:
                first = functools.partial(self._layer_hook, layer.name)
                last = functools.partial(self._layer_output_seen, layer.name)
                module = layer.module
                self._handles.append(module.register_forward_hook(first, prepend=True))
                self._handles.append(module.register_forward_hook(last))
                continue
            weight = layer.module.get_parameter(layer.weight_name)
            self._projections[id(weight)] = _Projection(layer)
            attentions[id(layer.attention)] = layer.attention
        for attention in attentions.values():
            name = self._attention_name(attention)
            pre = functools.partial(self._attention_starts, name)
            post = functools.partial(self._attention_ends, name)
            self._handles.append(
                attention.register_forward_pre_hook(pre, with_kwargs=True)
            )
            self._handles.append(attention.register_forward_hook(post))
        if self.diagonal:
            for entry in self.layout.diagonal_modules:
                hooked = has_pre_hooks(entry.module)
                pre = functools.partial(self._diagonal_starts, entry.name)
                hook = functools.partial(self._diagonal_hook, entry.name, hooked)
                self._handles.append(
                    entry.module.register_forward_pre_hook(
                        pre, prepend=True, with_kwargs=True
                    )
                )
                self._handles.append(
                    entry.module.register_forward_hook(
                        hook, prepend=True, with_kwargs=True
                    )
                )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop_watching()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take_gradients(self, name: str) -> list[Any]:
        """The output gradients of a module so far, one per backward pass, removed.

        Args:
            name: A Kronecker layer or a diagonal module of the layout.

        Returns:
            For a Kronecker layer, one tensor per backward pass (``(B, S, d_out)``
            for an attention projection); for a diagonal module one
            :data:`LeafGradients` per pass; empty if none reached the module.
        """
        if name in self._gradients:
            dim = self.batch_dims.get(name, 0)
            return [g.movedim(dim, 0) for g in self._gradients.pop(name)]
        if name in self._leaf_gradients:
            return self._diagonal_gradients(name)
        for projection in self._projections.values():
            if projection.layer.name == name:
                return self._projection_gradients(projection)
        return []

    def check_ran(self, layer: KroneckerLayer) -> None:
        """Refuse a Kronecker layer of the posterior that did not run.

        Args:
            layer: A layer of the layout, after the forward pass.

        Raises:
            ValueError: If it did not run in the forward pass.
        """
        if layer.name not in self.outputs:
            raise ValueError(
                f"Module '{layer.name}' has parameters in the posterior but did not "
                "run in the forward pass; freeze its parameters with "
                "requires_grad_(False)."
            )

    def take_input(self, name: str) -> Tensor:
        """A Kronecker layer's input with its batch in dimension 0, removed.

        Args:
            name: A Kronecker layer of the layout that ran.

        Returns:
            The detached input.
        """
        return self.inputs.pop(name).movedim(self.batch_dims.get(name, 0), 0)

    def forget_gradients(self) -> None:
        """Drop every gradient stored so far (after a probing pass)."""
        self._gradients.clear()
        self._leaf_gradients.clear()
        for projection in self._projections.values():
            for gradients in projection.gradients:
                gradients.clear()

    def raw_gradient(self, name: str) -> Tensor | None:
        """The one gradient that reached a layer or a diagonal module's output."""
        if name in self._gradients:
            (gradient,) = self._gradients.pop(name)
            return gradient
        if name not in self.calls:  # a layer that no gradient reached
            return None
        per_leaf = self._leaf_gradients.pop(name, {})
        first = next(
            (i for i, shape in enumerate(self.calls[name].output_shapes) if shape),
            None,
        )
        gradients = per_leaf.get(first, [])
        return gradients[0] if gradients else None

    def _diagonal_gradients(self, name: str) -> list[LeafGradients]:
        per_leaf = self._leaf_gradients.pop(name)
        passes = max(len(gradients) for gradients in per_leaf.values())
        leaves = len(self.calls[name].output_dims)
        return [
            tuple(
                per_leaf[i][k] if i in per_leaf and k < len(per_leaf[i]) else None
                for i in range(leaves)
            )
            for k in range(passes)
        ]

    def _projection_gradients(self, projection: _Projection) -> list[Tensor]:
        """Per pass, the calls' gradients in their weight rows, as positions."""
        passes = max((len(g) for g in projection.gradients), default=0)
        width = projection.layer.out_features
        assembled = []
        for k in range(passes):
            parts = []
            for a, (start, stop), gradients in zip(
                projection.inputs, projection.rows, projection.gradients
            ):
                part = a.new_zeros(*a.shape[:2], width)
                if k < len(gradients):
                    part[..., start:stop] = gradients[k]
                parts.append(part)
            assembled.append(torch.cat(parts, dim=1))
        for gradients in projection.gradients:
            gradients.clear()
        return assembled

    def _another_call(self, name: str) -> None:
        """Before a module's call is recorded: keep the earlier one if it ran."""
        if name in self._repeated or not (name in self.inputs or name in self.calls):
            return
        self._repeated[name] = [self._current_call(name)]

    def _current_call(self, name: str) -> _Call:
        """What is recorded now for ``name`` (its latest call)."""
        return _Call(
            self.inputs.get(name),
            self.outputs.get(name),
            self.calls.get(name),
            self.changed_by_hooks.get(name, False),
            self._nodes.get(name, []),
        )

    @property
    def repeated_modules(self) -> list[str]:
        """The modules of the layout that ran more than once so far.

        Empty again after :meth:`settle_calls`.
        """
        return list(self._repeated)

    def settle_calls(self, f: Tensor) -> None:
        """Keep, for a module that ran several times, the one call that counts.

        A module may run more than once in a forward pass while only one call
        reaches the outputs: peft's DoRA applies ``lora_A`` and ``lora_B`` to an
        identity matrix for the weight norm, which it detaches. The call whose
        outputs are in ``f``'s autograd graph is kept (inputs, outputs, call); the
        others add nothing to any gradient.

        Args:
            f: The outputs of the captured forward pass.

        Raises:
            ReusedModuleError: If several calls of one module reach ``f``.
        """
        if not self._repeated:
            return
        reached = _graph_nodes(f)
        for name, calls in self._repeated.items():
            counted = [
                call for call in calls if any(node in reached for node in call.nodes)
            ]
            if len(counted) > 1:
                raise ReusedModuleError(name, len(counted))
            kept = counted[0] if counted else calls[-1]
            for store, value in (
                (self.inputs, kept.input),
                (self.outputs, kept.outputs),
                (self.calls, kept.call),
            ):
                if value is not None:
                    store[name] = value
            self.changed_by_hooks[name] = kept.changed
        self._repeated.clear()

    def _watch(self, name: str, output: Tensor) -> None:
        if output.requires_grad:
            output.register_hook(_weak_hook(self, "_store_gradient", name))

    # A tensor hook is called with None where autograd has no gradient for the
    # tensor (a custom Function's backward may return None): the pass did not reach
    # the module, as if the hook had not fired.

    def _store_gradient(self, name: str, gradient: Tensor | None) -> None:
        if gradient is None:
            return
        if name in self.routes:
            gradient = laid_out(gradient, *self.routes[name])
        if self.receiver is not None:
            dim = self.batch_dims.get(name, 0)
            self.receiver(name, gradient.detach().movedim(dim, 0))
        else:
            self._gradients.setdefault(name, []).append(gradient.detach())

    def _store_leaf(self, name: str, leaf: int, gradient: Tensor | None) -> None:
        if gradient is not None:
            per_leaf = self._leaf_gradients.setdefault(name, {})
            per_leaf.setdefault(leaf, []).append(gradient.detach())

    def _layer_hook(
        self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor
    ) -> None:
        """First of the forward hooks: the input and output of ``forward``."""
        self._another_call(name)
        self.inputs[name] = args[0].detach()
        self.outputs[name] = (output, tensor_version(output))
        self._watch(name, output)
        self._nodes[name] = _nodes([output])
        if name in self._repeated:
            self._repeated[name].append(self._current_call(name))

    def _layer_output_seen(
        self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any
    ) -> None:
        """Last of the forward hooks: did the user's hooks change the output?"""
        raw, version = self.outputs[name]
        self.changed_by_hooks[name] = (
            output is not raw or tensor_version(raw) != version
        )
        if not self.keep_outputs:
            self.outputs[name] = (None, version)
        if name in self._repeated:
            self._repeated[name][-1].outputs = self.outputs[name]
            self._repeated[name][-1].changed = self.changed_by_hooks[name]

    def _diagonal_starts(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """First of the pre-hooks: the arguments as the caller passed them."""
        self._raw_calls[name] = (args, dict(kwargs))

    def _diagonal_hook(
        self,
        name: str,
        pre_hooked: bool,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> Tensor | None:
        """First of the forward hooks: the call, with the raw arguments."""
        self._another_call(name)
        args, kwargs = self._raw_calls.pop(name, (args, kwargs))
        replaced = None
        if isinstance(output, Tensor) and self._shared(output):
            # One row broadcast to every example (a position embedding called on
            # positions of shape (1, T)): the gradient at the broadcast output would
            # be the batch's sum. Handing on an expanded view, which downstream
            # broadcasting treats alike, gives each example's gradient.
            replaced = output = output.expand(self.batch, *output.shape[1:])
        dim = self.batch_dims.get(name, 0)
        self.calls[name] = ModuleCall.of(
            name, module, args, kwargs, output, self.batch, dim, pre_hooked
        )
        leaves, spec = tree_flatten(output)
        if sum(_differentiable(leaf) for leaf in leaves) > 1:
            # An output the module also computes another output from (a router's
            # logits beside the softmax of them): the gradient arriving at that
            # tensor would include the module's own use of it. An alias per output
            # receives only what the caller's uses send back.
            leaves = [
                leaf.view_as(leaf) if _differentiable(leaf) else leaf for leaf in leaves
            ]
            replaced = tree_unflatten(leaves, spec)
        for leaf_index, leaf in enumerate(leaves):
            if _differentiable(leaf):
                leaf.register_hook(_weak_hook(self, "_store_leaf", name, leaf_index))
        self._nodes[name] = _nodes(leaves)
        if name in self._repeated:
            self._repeated[name].append(self._current_call(name))
        return replaced

    def _shared(self, output: Tensor) -> bool:
        return (
            self.batch is not None
            and self.batch > 1
            and output.ndim > 0
            and output.shape[0] == 1
        )

    def _attention_name(self, attention: nn.Module) -> str:
        for layer in self.layout.layers:
            if layer.attention is attention:
                return layer.name.removesuffix(".out_proj").removesuffix(".in_proj")
        raise AssertionError("not an attention of the layout")

    def _attention_starts(
        self,
        name: str,
        module: nn.MultiheadAttention,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Before an attention's forward: its sequence length and batch size."""
        if id(module) in self._attentions or any(
            projection.inputs
            for projection in self._projections.values()
            if projection.layer.attention is module
        ):
            raise ReusedModuleError(name)
        query = args[0] if args else kwargs["query"]
        if query.ndim != 3:
            raise UnsplittableCallError(name, module, "takes an unbatched sequence")
        length, batch = query.shape[:2]
        if module.batch_first:
            length, batch = batch, length
        self._attentions[id(module)] = (length, batch)
        self._stop_watching()
        self._restore_linear = watching_functional_linear(self._linear_call)

    def _attention_ends(
        self, name: str, module: nn.MultiheadAttention, args: Any, output: Any
    ) -> None:
        """After an attention's forward: its projections' inputs, as positions."""
        self._stop_watching()
        del self._attentions[id(module)]
        for projection in self._projections.values():
            layer = projection.layer
            if layer.attention is not module or not projection.inputs:
                continue  # not run (frozen attention): reported as not run
            self.inputs[layer.name] = torch.cat(projection.inputs, dim=1)

    def _stop_watching(self) -> None:
        if self._restore_linear is not None:
            self._restore_linear()
            self._restore_linear = None

    def _linear_call(
        self, input: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor
    ) -> None:
        """An ``F.linear`` call: keep it if it applies an attention projection."""
        base = weight if id(weight) in self._projections else weight._base
        projection = self._projections.get(id(base)) if base is not None else None
        if projection is None:
            return
        layer = projection.layer
        if id(layer.attention) not in self._attentions:
            raise CaptureError(
                f"The weight of '{layer.name}' is used outside the forward pass of "
                "its nn.MultiheadAttention; EKFAC captures it only there. Freeze it "
                "with requires_grad_(False)."
            )
        length, batch = self._attentions[id(layer.attention)]
        start = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
        rows = (start, start + weight.shape[0])
        index = len(projection.inputs)
        projection.inputs.append(_batch_first(input, length, batch).detach())
        projection.rows.append(rows)
        projection.gradients.append([])
        kept = output if self.keep_outputs else None
        self.outputs[layer.name] = (kept, tensor_version(output))
        if output.requires_grad:

            def store(gradient: Tensor | None) -> None:
                if gradient is not None:  # None: the pass did not reach it
                    projection.gradients[index].append(
                        _batch_first(gradient.detach(), length, batch)
                    )

            output.register_hook(store)


def _weak_hook(capture: ForwardCapture, method: str, *args: Any) -> Any:
    """A tensor hook that calls ``capture.method(*args, gradient)`` while it lives.

    A hook on an output tensor lives in autograd's graph, which Python's garbage
    collector cannot see into: a hook holding the capture (which holds the output)
    would keep both, and the batch's graph, alive forever.
    """
    reference = weakref.ref(capture)

    def hook(gradient: Tensor) -> None:
        alive = reference()
        if alive is not None:
            getattr(alive, method)(*args, gradient)

    return hook


@dataclass
class _Call:
    """One call of a module that ran several times in a forward pass."""

    input: Tensor | None
    outputs: tuple[Tensor | None, int] | None
    call: ModuleCall | None
    changed: bool
    nodes: list[Any]  # the autograd nodes of its outputs


def _nodes(outputs: list[Any]) -> list[Any]:
    """The autograd nodes that produced the differentiable ``outputs``."""
    return [
        leaf.grad_fn
        for leaf in outputs
        if _differentiable(leaf) and leaf.grad_fn is not None
    ]


def _graph_nodes(f: Tensor) -> set[Any]:
    """Every autograd node that ``f`` depends on (its graph, walked once)."""
    seen: set[Any] = set()
    stack = [f.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return seen


def laid_out(tensor: Tensor, destinations: Tensor, length: int) -> Tensor:
    """Rows of ``tensor`` moved to ``destinations`` of ``length`` zero rows."""
    out = tensor.new_zeros(length, *tensor.shape[1:])
    out[destinations.to(tensor.device)] = tensor
    return out


def _differentiable(leaf: Any) -> bool:
    return isinstance(leaf, Tensor) and leaf.requires_grad


def _batch_first(tensor: Tensor, length: int, batch: int) -> Tensor:
    """A projection's sequence-first tensor as ``(B, S, d)``.

    In-projections see ``(S, B, d)``; the out-projection sees ``(L·B, d)``, the rows
    ordered position-major.
    """
    if tensor.ndim == 2:
        tensor = tensor.reshape(length, batch, tensor.shape[-1])
    return tensor.transpose(0, 1)
